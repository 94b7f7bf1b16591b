"""Sweep figures: metric heatmaps (matplotlib) and an image montage over the (w_d, w_c) grid.

Heatmap: one cell per grid point with its value printed at one rounding for the whole map,
a colour bar, the best cell framed (the frame surrounds the value, it does not cover it). The
colour map is flipped for lower-is-better metrics, so the better end is always yellow.

Montage: rows are the y axis (w_d), columns the x axis (w_c), each cell a strip of the first few
samples of that job (the same seeds in every cell), labelled with the axis values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (headless nodes, sweep callbacks)

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from idgen.utils.images import font as label_font  # noqa: E402
from idgen.utils.io import save_image_atomic  # noqa: E402


def decimals_for(values: Sequence[float], digits: int = 3) -> int:
    """Decimal places showing ``digits`` significant digits of the largest |value| (0 to 4).

    One rounding for the whole map, so 0.250 and 0.031 print as "0.250" and "0.031" rather than
    "0.25" and "0.0312".
    """
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    largest = max(finite, default=0.0)
    if largest == 0.0:
        return 2
    return int(min(max(digits - 1 - math.floor(math.log10(largest)), 0), 4))


def format_value(value: float | None, decimals: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{decimals}f}"


def _axis_label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def heatmap_figure(
    grid: Sequence[Sequence[float | None]],
    x_values: Sequence,
    y_values: Sequence,
    x_label: str,
    y_label: str,
    title: str,
    best: tuple[int, int] | None,
    higher_is_better: bool = False,
) -> Figure:
    """The heatmap of ``grid[row=y][col=x]`` as a matplotlib figure (rows top to bottom)."""
    rows, cols = len(y_values), len(x_values)
    values = [v for row in grid for v in row]
    decimals = decimals_for(values)
    data = [[math.nan if v is None else float(v) for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.1 * cols + 2.6, 0.8 * rows + 1.8), dpi=150)
    cmap = plt.get_cmap("viridis" if higher_is_better else "viridis_r")
    cmap = cmap.with_extremes(bad="#dddddd")  # unfinished or failed grid points
    image = ax.imshow(data, cmap=cmap, aspect="auto")
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
    bar.set_label(f"{title.split(' ')[0]} ({'higher' if higher_is_better else 'lower'} is better)")
    # value labels: dark text on light cells, white on dark ones
    for r in range(rows):
        for c in range(cols):
            v = grid[r][c]
            rgba = cmap(image.norm(v)) if v is not None and math.isfinite(v) else (0.87,) * 3
            luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(
                c,
                r,
                format_value(v, decimals),
                ha="center",
                va="center",
                fontsize=9,
                color="black" if luminance > 0.5 else "white",
            )
    if best is not None:  # a frame just inside the cell border: the value stays readable
        r, c = best
        ax.add_patch(
            Rectangle((c - 0.46, r - 0.46), 0.92, 0.92, fill=False, edgecolor="red", linewidth=2.5)
        )
    ax.set_xticks(range(cols), [_axis_label(v) for v in x_values])
    ax.set_yticks(range(rows), [_axis_label(v) for v in y_values])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ montage


@dataclass
class MontageLayout:
    """Where each cell went: ``boxes[(row, col)] = (left, top)`` of its first thumbnail."""

    thumb: int
    per_cell: int
    boxes: dict[tuple[int, int], tuple[int, int]]


def draw_montage(
    cells: dict[tuple[int, int], Sequence[str | os.PathLike]],
    x_values: Sequence,
    y_values: Sequence,
    x_label: str,
    y_label: str,
    path: str | os.PathLike,
    per_cell: int = 3,
    thumb: int = 96,
    title: str = "",
) -> tuple[Path, MontageLayout]:
    """Rows ``y_values``, columns ``x_values``; cell (r, c) shows the first ``per_cell`` images
    of ``cells[(r, c)]`` side by side at ``thumb`` px. Missing cells stay blank."""
    rows, cols = len(y_values), len(x_values)
    gap, pad = 4, 10
    font, small = label_font(15), label_font(13)
    left = 16 + max(int(small.getlength(f"{y_label}={_axis_label(v)}")) for v in y_values)
    top = (28 if title else 0) + 30
    cell_w = per_cell * thumb + (per_cell - 1) * 2
    width = left + cols * (cell_w + gap) + pad
    height = top + rows * (thumb + gap) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6), title, fill="black", font=font)
    boxes: dict[tuple[int, int], tuple[int, int]] = {}
    for c, xv in enumerate(x_values):
        label = f"{x_label}={_axis_label(xv)}"
        x0 = left + c * (cell_w + gap)
        draw.text(
            (x0 + (cell_w - small.getlength(label)) / 2, top - 22), label, fill="black", font=small
        )
    for r, yv in enumerate(y_values):
        y0 = top + r * (thumb + gap)
        draw.text((8, y0 + thumb / 2 - 8), f"{y_label}={_axis_label(yv)}", fill="black", font=small)
        for c in range(cols):
            x0 = left + c * (cell_w + gap)
            boxes[(r, c)] = (x0, y0)
            for k, file in enumerate(list(cells.get((r, c), ()))[:per_cell]):
                with Image.open(file) as im:
                    tile = im.convert("RGB").resize((thumb, thumb), Image.Resampling.BICUBIC)
                canvas.paste(tile, (x0 + k * (thumb + 2), y0))
    out = save_image_atomic(canvas, path, text={"title": title or "sweep montage"})
    return out, MontageLayout(thumb=thumb, per_cell=per_cell, boxes=boxes)
