"""What a text-to-3D run shows: a turntable GIF and a loss curve PNG (PIL only, no matplotlib)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from idgen.utils.io import atomic_write_bytes


def to_frames(rgb: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, H*scale, W*scale, 3]`` uint8 (nearest upscaling)."""
    frames = (rgb.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 1).cpu().numpy()
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return frames


def write_gif(frames: np.ndarray, path: str | Path, fps: float = 12.0) -> Path:
    """An endlessly looping GIF of ``[N, H, W, 3]`` uint8 frames, written atomically."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be [N, H, W, 3] with N >= 1, got {frames.shape}")
    data = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)
    return atomic_write_bytes(path, data)


def write_loss_curve(
    series: dict[str, Sequence[float]], path: str | Path, size: tuple[int, int] = (560, 320)
) -> Path:
    """Line plot of each named series against the step (a running mean of 1/20 of the run).

    Non-finite values are skipped; the y axis spans the smoothed values' range.
    """
    w, h = size
    left, right, top, bottom = 60, 12, 14, 34
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    smoothed = {}
    for name, values in series.items():
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            continue
        k = max(1, len(v) // 20)
        finite = np.where(np.isfinite(v), v, np.nan)
        kernel = np.ones(k) / k
        smoothed[name] = np.convolve(np.nan_to_num(finite, nan=np.nanmean(finite)), kernel, "valid")
    n = max((len(v) for v in series.values()), default=1)
    values = np.concatenate(list(smoothed.values())) if smoothed else np.zeros(1)
    lo, hi = float(values.min()), float(values.max())
    if not math.isfinite(lo) or hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0

    def xy(i: float, y: float) -> tuple[float, float]:
        return (
            left + (w - left - right) * i / max(n - 1, 1),
            top + (h - top - bottom) * (1 - (y - lo) / (hi - lo)),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):
        y = lo + (hi - lo) * frac
        draw.text((4, xy(0, y)[1] - 6), f"{y:.3g}", fill="black", font=font)
    draw.text((left, h - bottom + 6), "0", fill="black", font=font)
    draw.text((w - right - 40, h - bottom + 6), f"step {n}", fill="black", font=font)
    for c, (name, v) in enumerate(smoothed.items()):
        offset = (len(series[name]) - len(v)) / 2
        pts = [xy(i + offset, float(y)) for i, y in enumerate(v)]
        colour = colours[c % len(colours)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        draw.text((left + 8, top + 4 + 12 * c), name, fill=colour, font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
