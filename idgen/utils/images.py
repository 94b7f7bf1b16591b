"""Image grids and tensor <-> PIL conversions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images into one grid image (row-major)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), "white")
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(image.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
