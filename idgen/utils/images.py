"""Image grids for people: tiled images with a title above and a label under each image."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


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
) -> Image.Image:
    """Tile equally sized PIL images into one grid image (row-major) on white.

    ``title`` is written above the grid (wrapped to its width), ``labels[i]`` under image ``i``
    (cut to the image's width), so a grid says what it shows without its file name.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_grid got {len(labels)} labels for {len(images)} images")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    width = ncols * w + (ncols + 1) * pad
    text_font = font(max(10, w // 16))  # sized to the cells: readable at 64 px and at 512 px
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
