"""Image folders for evaluation: listing, loading as uint8 tensors, PNG text chunks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# training's loader: alpha, 16-bit, CMYK, EXIF rotation, clear errors
from idgen.data.images import DEFAULT_EXTENSIONS, list_image_files, load_rgb
from idgen.utils.validation import ConfigError, PathError, UserInputError


class ImageFolderError(UserInputError, FileNotFoundError):
    """An evaluation image folder is missing, empty or holds an unreadable file (a user error:
    one line, exit 2)."""


def list_images(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """Sorted image files under ``folder``; a clear error when there is none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageFolderError(f"{what} '{folder}' does not exist or is not a folder.")
    files = list_image_files(folder, DEFAULT_EXTENSIONS)
    if not files:
        raise ImageFolderError(
            f"{what} '{folder}' holds no images (looked for {', '.join(DEFAULT_EXTENSIONS)})."
        )
    return files


def scan_reference(
    folder: str | os.PathLike, scan_cache_dir: str | os.PathLike | None = None
) -> list[Path]:
    """The usable images of a reference folder, exactly as training scans its ``data.root``.

    Same code as ``DomainImageDataModule.scan``: recursive, sorted, corrupt / truncated / empty /
    non-image files skipped with one ``SkippedImagesWarning`` that counts them and names the
    first few, and the same scan cache (``<cache>/scans``), so evaluating the training folder
    reuses training's scan.
    """
    from idgen.data.datamodule import DomainImageDataModule

    scanner = DomainImageDataModule(
        root=str(folder),
        resolution=1,  # unused by scan()
        scan_cache_dir=str(scan_cache_dir) if scan_cache_dir else None,
    )
    try:
        return scanner.scan()
    except ConfigError as err:  # named for training's data.root: say reference_dir here
        raise PathError("reference_dir", str(folder), err.problem, "Check the files.") from None
    except (FileNotFoundError, ValueError) as err:
        raise ImageFolderError(f"reference image folder: {err}") from err


def resize_center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """[3, R, R] uint8: training's own transform (``build_image_transform``, no flip).

    The short side is resized to ``resolution`` (bicubic, antialiased) and the centre cropped,
    so evaluation reads the reference images exactly as the model saw them in training.
    """
    from idgen.data.transforms import build_image_transform

    pixels = build_image_transform(resolution, center_crop=True, random_flip=False)(image)
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_uint8(path: str | os.PathLike, resolution: int | None = None) -> torch.Tensor:
    """Read ``path`` as a [3, H, W] uint8 RGB tensor; at ``resolution``^2 if given.

    Resizing is training's: short side to ``resolution``, then a centre crop
    (:func:`resize_center_crop`), so mixed sizes and aspect ratios are fine.
    """
    try:
        image = load_rgb(path)
    except Exception as err:
        raise ImageFolderError(f"cannot read image '{path}': {err}. Remove or replace it.") from err
    if resolution is not None and image.size != (resolution, resolution):
        return resize_center_crop(image, resolution)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_batch(paths: Sequence[Path], resolution: int | None = None) -> torch.Tensor:
    """Stack images into [B, 3, H, W] uint8; sizes must agree unless ``resolution`` is set."""
    images = [load_uint8(p, resolution) for p in paths]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise ImageFolderError(
            f"images have different sizes {sorted(sizes)} (e.g. '{paths[0]}'); "
            "set resolution=<int> (idgen-eval) to resize and centre-crop them all."
        )
    return torch.stack(images)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    with Image.open(path) as image:
        return image.size


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG (prompt, seed, weights written by idgen-sample); {} otherwise."""
    with Image.open(path) as image:
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
