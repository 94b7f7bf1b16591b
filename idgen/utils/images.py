"""Image grids for people: tiled images with a title above and a label under each image.

Small images (the tiny model's 64 px, the toy world's 32 px) are enlarged in the grid to at
least :data:`MIN_CELL` pixels by an integer factor with nearest-neighbour resampling: every
pixel becomes a solid block, nothing is smoothed or invented, and the captions are written at
a size a person can read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

#: pixels: a grid cell's short side is enlarged (nearest, integer factor) to at least this
MIN_CELL = 256


def upscale(image: Image.Image, min_side: int = MIN_CELL) -> Image.Image:
    """``image`` enlarged by the smallest integer factor that makes its short side >=
    ``min_side``, nearest-neighbour (each pixel a k x k block); unchanged when already large."""
    short = min(image.size)
    factor = max(1, math.ceil(min_side / short)) if short else 1
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at ``size`` px: the one font of idgen's drawn figures."""
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (long words cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, font, width))
    return lines


def make_grid(
    images: Sequence[Image.Image],
    ncols: int | None = None,
    pad: int = 2,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """Tile equally sized PIL images into one grid image (row-major) on white.

    ``title`` is written above the grid (wrapped to its width), ``labels[i]`` under image ``i``
    (cut to the image's width), so a grid says what it shows without its file name. Images
    smaller than ``min_cell`` pixels are enlarged to it first (:func:`upscale`; 0: as they are).
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_grid got {len(labels)} labels for {len(images)} images")
    images = [upscale(image, min_cell) for image in images]
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    width = ncols * w + (ncols + 1) * pad
    text_font = font(max(10, w // 16))  # sized to the cells: 16 px at 256, 32 px at 512
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = text_font.getbbox("Hg")[3] + 4  # one text line: tallest glyphs plus a little air
    title_lines = _wrap(measure, title, text_font, width - 2 * pad) if title else []
    top = len(title_lines) * line + (pad if title_lines else 0)
    label_h = line if labels is not None else 0
    height = top + nrows * (h + label_h) + (nrows + 1) * pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(title_lines):
        draw.text((pad, pad + k * line), text, fill="black", font=text_font)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        left, upper = pad + c * (w + pad), top + pad + r * (h + label_h + pad)
        grid.paste(image.convert("RGB"), (left, upper))
        if labels is not None:
            text = _fit(draw, str(labels[i]), text_font, w - 4)
            draw.text((left + 2, upper + h + 2), text, fill="black", font=text_font)
    return grid
