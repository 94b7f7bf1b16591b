"""Atomic writes: a file is either absent, the old version, or complete — never half-written."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import tempfile
import time
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

log = logging.getLogger(__name__)

#: when this process started writing (about: when idgen was imported); a temp file older than
#: this that no live process owns is a killed run's leftover
PROCESS_START = time.time()
#: this machine, as written into temp-file names (a folder may be shared between machines)
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
# .<target>.<host>-<pid>-<random>.tmp (older idgen: .<target>.<random>.tmp)
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?[^.]+\.tmp$")
#: a temp file of another machine (or of an older idgen) is a leftover when older than this
FOREIGN_TEMP_AGE_S = 24 * 3600.0


def temp_prefix(path: Path) -> str:
    """The name start of ``path``'s temp files: ``.<name>.<host>-<pid>-`` (who writes it)."""
    return f".{path.name}.{_HOST}-{os.getpid()}-"


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Any) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename.

    ``data``: bytes, or a callable that writes into the open binary file (so large objects are
    streamed to disk, never held whole in memory).
    The temp file ``.<name>.<host>-<pid>-<random>.tmp`` names its writer, so a later run can
    tell a killed writer's leftover from a write in progress (:func:`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
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
    """``torch.save`` atomically, streamed into the temp file: a checkpoint (weights and
    optimizer state: gigabytes at SD1.5 scale) is never serialised into memory first."""
    return atomic_write_bytes(path, lambda f: torch.save(obj, f))


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(
    folder: str | os.PathLike, target_glob: str, started: float | None = None
) -> list[Path]:
    """Delete the temp files that killed atomic writes of ``target_glob`` left in ``folder``.

    A temp file (``.<target>.<host>-<pid>-<random>.tmp``, ``target`` matching ``target_glob``,
    e.g. ``reference-features-*.pt``) is a leftover when it is older than ``started`` (default:
    this process's start) and its writer is gone: a process of this machine that no longer runs
    (or an older idgen's, whose temp names carry no writer); another machine's when it is also
    older than a day. A write in progress in a live process is never touched. Returns what was
    removed.
    """
    folder = Path(folder)
    started = PROCESS_START if started is None else started
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".{target_glob}.*.tmp"):
        match = _TEMP.match(path.name)
        if match is None:
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if mtime >= started:
            continue
        pid = match["pid"]
        if match["host"] == _HOST and pid is not None:
            stale = int(pid) != os.getpid() and not _alive(int(pid))
        else:
            stale = time.time() - mtime >= FOREIGN_TEMP_AGE_S or pid is None
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed the leftover of a killed write: %s", path)
    return removed
