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


def _to_uint8(array: np.ndarray, max_value: float) -> np.ndarray:
    """Scale ``array`` from ``[0, max_value]`` (its format's full range) to 8 bits."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    return np.clip(array / max_value * 255.0 + 0.5, 0, 255).astype(np.uint8)


def full_scale(image: Image.Image) -> float:
    """The value that means "white" for a grayscale image of mode I;16*, I or F.

    Decided by the bit depth of the mode, never by the pixel values: a 16-bit image whose pixels
    are all <= 255 is a very dark image, not an 8-bit one. Mode ``I`` (32-bit container) holds
    16-bit data when it comes from a PNG or any file whose values fit 16 bits. Float images
    (mode ``F``) carry no depth; they are taken as [0, 1] unless a value exceeds 1, then as 8-bit
    (> 255: 16-bit) data stored as floats.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return 65535.0
    array = np.asarray(image)
    peak = float(array.max(initial=0))
    if mode == "I":
        return 65535.0 if image.format == "PNG" or peak <= 65535 else 4294967295.0
    if mode == "F":
        return 1.0 if peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
    raise ValueError(f"full_scale: mode {mode!r} is not a single-channel 16/32-bit mode")


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
        gray = _to_uint8(np.asarray(image), full_scale(image))
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
