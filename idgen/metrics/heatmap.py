"""Heatmap PNGs drawn with PIL (matplotlib is not a dependency)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from idgen.utils.io import save_image_atomic

# viridis anchors: low values dark purple, high values yellow
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colormap(t: float) -> tuple[int, int, int]:
    """Piecewise-linear viridis for ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def draw_heatmap(
    grid: Sequence[Sequence[float | None]],
    x_values: Sequence,
    y_values: Sequence,
    x_label: str,
    y_label: str,
    title: str,
    best: tuple[int, int] | None,
    path: str | os.PathLike,
    cell: int = 64,
) -> Path:
    """Draw ``grid[row=y][col=x]`` as coloured cells with values; ``best`` (row, col) is framed in red."""
    font = ImageFont.load_default()
    left, top, right, bottom = 90, 40, 20, 50
    rows, cols = len(y_values), len(x_values)
    width = max(left + cols * cell + right, 8 + int(font.getlength(title)) + 8)
    height = top + rows * cell + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    finite = [v for row in grid for v in row if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi - lo or 1.0
    draw.text((8, 8), title, fill="black", font=font)
    for r in range(rows):
        for c in range(cols):
            v = grid[r][c]
            x0, y0 = left + c * cell, top + r * cell
            ok = v is not None and math.isfinite(v)
            colour = colormap((v - lo) / span) if ok else (200, 200, 200)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline="white")
            luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            text = _fmt(v) if ok else "-"
            draw.text(
                (x0 + 6, y0 + cell // 2 - 6),
                text,
                fill="black" if luminance > 128 else "white",
                font=font,
            )
        draw.text((8, top + r * cell + cell // 2 - 6), f"{y_values[r]}", fill="black", font=font)
    for c in range(cols):
        draw.text(
            (left + c * cell + 6, top + rows * cell + 6), f"{x_values[c]}", fill="black", font=font
        )
    draw.text((left, top + rows * cell + 26), f"x: {x_label}", fill="black", font=font)
    draw.text((8, top - 16), f"y: {y_label}", fill="black", font=font)
    if best is not None:
        r, c = best
        x0, y0 = left + c * cell, top + r * cell
        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(255, 0, 0), width=4)
        draw.text((x0 + 6, y0 + 6), "best", fill=(255, 0, 0), font=font)
    return save_image_atomic(image, path, text={"title": title})
