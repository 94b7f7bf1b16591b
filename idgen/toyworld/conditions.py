"""Spatial conditions of the toy world: the object's mask, and how well a sample follows it.

A condition is the mask of one rendered object: the same ``ShapeSpec`` drawn white on black
by the renderer itself (same geometry, same anti-aliasing), so a condition and the image it
came from line up exactly. Alignment is the intersection over union of the condition's mask
(pixels > 127) and the sample's foreground mask, with the toy metrics' foreground rule
(pixels far from the border median, ``idgen.toyworld.metrics``).

    images, specs = render_world("open", 8, seed=0)
    masks = [render_mask(s, 32) for s in specs]
    mask_iou(np.asarray(images[0]), np.asarray(masks[0]))   # about 1 on ground truth
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from idgen.toyworld.metrics import FOREGROUND_DISTANCE, border_median
from idgen.toyworld.render import ShapeSpec, caption, render_spec, render_world
from idgen.utils.io import atomic_write_text, save_image_atomic

MASK_FILL = (255, 255, 255)
MASK_BACKGROUND = (0, 0, 0)
# File beside the condition PNGs: file name -> the spec it was drawn from and its caption.
CONDITIONS_INDEX = "conditions.jsonl"


def render_mask(spec: ShapeSpec, resolution: int) -> Image.Image:
    """The object of ``spec`` white on black, RGB (a ControlNet condition image)."""
    plain = dataclasses.replace(spec, fill=MASK_FILL, background=MASK_BACKGROUND)
    return render_spec(plain, resolution)


def condition_mask(condition: np.ndarray) -> np.ndarray:
    """Boolean HxW mask of a condition image (HxW or HxWx3 uint8, white object on black)."""
    gray = condition.mean(-1) if condition.ndim == 3 else condition
    return gray > 127


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Boolean HxW foreground of an HxWx3 uint8 sample: the toy metrics' rule."""
    distance = np.linalg.norm(image.astype(np.float32) - border_median(image), axis=-1)
    return distance > FOREGROUND_DISTANCE


def mask_iou(sample: np.ndarray, condition: np.ndarray) -> float:
    """IoU of the sample's foreground and the condition's mask (1 when both are empty)."""
    a, b = foreground_mask(sample), condition_mask(condition)
    if a.shape != b.shape:
        raise ValueError(f"sample is {a.shape[:2]} but its condition is {b.shape[:2]}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def write_conditions(
    folder: str | os.PathLike,
    num: int,
    resolution: int = 32,
    seed: int = 0,
    world: str = "domain",
    shapes: Sequence[str] | None = None,
) -> list[dict]:
    """Render ``num`` condition masks of ``world`` into ``folder`` (``c0000.png``, ...).

    ``shapes`` cycles the shape of condition i through the list (default: drawn at random), so
    a small set covers every shape. Returns (and writes to ``conditions.jsonl``) one record per
    condition: ``file``, ``caption`` (colour and shape of the image it came from) and ``spec``.
    A rerun with the same arguments rewrites the same files.
    """
    folder = Path(folder)
    records = []
    for i in range(num):
        shape = shapes[i % len(shapes)] if shapes else None
        # One seed per condition: condition i is the same whatever ``num`` is.
        _, (spec,) = render_world(world, 1, resolution, seed + i, shape=shape)
        name = f"c{i:04d}.png"
        save_image_atomic(render_mask(spec, resolution), folder / name)
        records.append(
            {
                "file": name,
                "caption": caption(spec.colour, spec.shape),
                "spec": dataclasses.asdict(spec),
            }
        )
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_text(folder / CONDITIONS_INDEX, lines)
    return records
