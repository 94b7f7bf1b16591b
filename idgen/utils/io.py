"""Atomic writes: a file is either absent, the old version, or complete — never half-written."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_image_atomic(
    image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None
) -> Path:
    """Save a PNG atomically; ``text`` goes into PNG tEXt chunks (prompt, seed, weights...)."""
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(str(key), str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buf.getvalue())


def save_figure_atomic(fig: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as a PNG atomically and close it (it is not shown again)."""
    import matplotlib.pyplot as plt  # only figure writers need matplotlib

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move a fully written folder ``tmp`` to ``out``; an older ``out`` is dropped only at the end."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
