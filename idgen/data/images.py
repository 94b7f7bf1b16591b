"""Robust reading of the image files real folders hold, as 8-bit RGB."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class UnreadableImage(ValueError):
    """A file could not be decoded as an image."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    hi = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(array / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, CMYK and 16-bit handled."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float grayscale: Pillow's convert("RGB") clips instead of scaling.
        gray = _to_uint8(np.asarray(image))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Fully decode ``path`` and return an RGB image; raise ``UnreadableImage`` naming the file."""
    try:
        with warnings.catch_warnings():
            # A decompression bomb is skipped like any other unreadable file.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except Exception as err:  # PIL raises many types for bad files
        raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from err


def list_image_files(root: str | os.PathLike, extensions: Sequence[str]) -> list[Path]:
    """Image-like files under ``root`` (recursive, symlinks followed), in sorted order."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in exts:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_images(
    paths: Iterable[Path], min_size: int = 0, skip_small: bool = False
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split ``paths`` into usable files and (file, reason) for the ones to skip."""
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for path in paths:
        try:
            if os.path.getsize(path) == 0:
                raise UnreadableImage(f"{path}: empty file")
            image = load_rgb(path)
        except (OSError, UnreadableImage) as err:
            bad.append((path, str(err)))
            continue
        if skip_small and min(image.size) < min_size:
            bad.append(
                (path, f"{path}: {image.size[0]}x{image.size[1]} is below min_size {min_size}")
            )
            continue
        good.append(path)
    return good, bad
