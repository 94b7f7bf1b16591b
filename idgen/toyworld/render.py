"""Deterministic renderer of the toy world: one coloured shape per image.

Open-world images put a red/green/blue/yellow circle, square or triangle on a LIGHT
background and carry a caption ("a red circle"); domain images draw the same shapes and
colours on a DARK background and are unlabeled. Everything is a function of a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DARK_BACKGROUND: tuple[int, int, int] = (20, 20, 28)
LIGHT_BACKGROUND: tuple[int, int, int] = (236, 234, 226)
WORLDS: dict[str, tuple[int, int, int]] = {"open": LIGHT_BACKGROUND, "domain": DARK_BACKGROUND}
# Draw at 4x and downsample: anti-aliased edges like a photo, not staircase pixels.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one rendered image, in fractions of the image size."""

    shape: str
    colour: str
    radius: float  # circumradius / image size
    cx: float
    cy: float
    angle: float  # radians; ignored for circles
    fill: tuple[int, int, int]


def caption(colour: str, shape: str) -> str:
    """The open-world caption of one image, e.g. ``"a red circle"``."""
    return f"a {colour} {shape}"


def all_captions() -> list[str]:
    """Every open-world caption, colours outer, shapes inner."""
    return [caption(c, s) for c in COLOURS for s in SHAPES]


def _check(shape: str | None, colour: str | None) -> None:
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}: expected one of {tuple(COLOURS)}")


def sample_spec(
    rng: np.random.Generator, shape: str | None = None, colour: str | None = None
) -> ShapeSpec:
    """Draw a random shape spec; ``shape``/``colour`` fix those attributes.

    The random draws happen in the same order whether or not an attribute is fixed, so a
    seed gives the same geometry for every caption.
    """
    _check(shape, colour)
    shape_draw = SHAPES[rng.integers(len(SHAPES))]
    colour_draw = list(COLOURS)[rng.integers(len(COLOURS))]
    shape, colour = shape or shape_draw, colour or colour_draw
    radius = float(rng.uniform(0.18, 0.3))
    cx, cy = (0.5 + rng.uniform(-0.15, 0.15, size=2)).tolist()
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    angle = float(rng.uniform(0, 2 * math.pi))
    return ShapeSpec(shape, colour, radius, cx, cy, angle, fill)


def render_spec(spec: ShapeSpec, resolution: int, background: tuple[int, int, int]) -> Image.Image:
    """Render one spec as an RGB ``PIL.Image`` of ``resolution`` x ``resolution``."""
    big = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    r, cx, cy = spec.radius * big, spec.cx * big, spec.cy * big
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=spec.fill)
    else:
        sides = 4 if spec.shape == "square" else 3
        points = [
            (
                cx + r * math.cos(spec.angle + 2 * math.pi * k / sides),
                cy + r * math.sin(spec.angle + 2 * math.pi * k / sides),
            )
            for k in range(sides)
        ]
        draw.polygon(points, fill=spec.fill)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def render_world(
    world: str,
    num_images: int,
    resolution: int = 32,
    seed: int = 0,
    shape: str | None = None,
    colour: str | None = None,
) -> tuple[list[Image.Image], list[ShapeSpec]]:
    """Render ``num_images`` images of ``world`` ("open": light, "domain": dark) from ``seed``."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}: expected 'open' (light) or 'domain' (dark)")
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, shape, colour) for _ in range(num_images)]
    return [render_spec(s, resolution, WORLDS[world]) for s in specs], specs


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack RGB images into ``[B, 3, H, W]`` in ``[-1, 1]`` (the DataModule's convention)."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def render_batch(
    world: str, batch_size: int, resolution: int = 32, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """A training batch: pixel values in ``[-1, 1]`` and the open-world captions."""
    images, specs = render_world(world, batch_size, resolution, seed)
    return to_tensor(images), [caption(s.colour, s.shape) for s in specs]
