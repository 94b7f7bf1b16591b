"""Deterministic renderer of the toy world: one coloured shape per image.

Open-world images put a red/green/blue/yellow circle, square or triangle on a background
drawn from a palette (light, grey, beige, slate, and rarely DARK) and carry a caption that
names colour and shape only ("a red circle"). Domain images draw the same shapes and colours
on the DARK background and are unlabeled. So the domain lies *inside* the open world but is
rare there (15 %) and cannot be asked for in words, as FFHQ's faces are a narrow slice of what
SD1.5 has seen. Everything is a function of a seed.
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
# Background palette of each world: name -> (RGB, probability). Every non-dark background has
# a mean channel value >= 160, far from the dark one (the metrics' threshold is 128), and is
# >= 60 (RGB distance) from every object colour, so objects stay visible on all of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light": LIGHT_BACKGROUND,
    "grey": (172, 172, 172),
    "beige": (214, 198, 164),
    "slate": (164, 178, 192),
    "dark": DARK_BACKGROUND,
}
WORLDS: dict[str, dict[str, float]] = {
    "open": {"light": 0.35, "grey": 0.2, "beige": 0.15, "slate": 0.15, "dark": 0.15},
    "domain": {"dark": 1.0},
}
# Per-image background jitter (each channel, +-), like lighting in photos.
_BACKGROUND_JITTER = 6
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
    background: tuple[int, int, int] = LIGHT_BACKGROUND


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
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    world: str = "open",
) -> ShapeSpec:
    """Draw a random shape spec of ``world``; ``shape``/``colour`` fix those attributes.

    The random draws happen in the same order whether or not an attribute is fixed, so a
    seed gives the same geometry for every caption (and in both worlds).
    """
    _check(shape, colour)
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}: expected one of {tuple(WORLDS)}")
    shape_draw = SHAPES[rng.integers(len(SHAPES))]
    colour_draw = list(COLOURS)[rng.integers(len(COLOURS))]
    shape, colour = shape or shape_draw, colour or colour_draw
    radius = float(rng.uniform(0.18, 0.3))
    cx, cy = (0.5 + rng.uniform(-0.15, 0.15, size=2)).tolist()
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    angle = float(rng.uniform(0, 2 * math.pi))
    names, probs = zip(*WORLDS[world].items(), strict=True)
    base = BACKGROUNDS[names[rng.choice(len(names), p=np.array(probs) / sum(probs))]]
    jitter = rng.integers(-_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1, size=3)
    background = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(base, jitter, strict=True))
    return ShapeSpec(shape, colour, radius, cx, cy, angle, fill, background)


def render_spec(spec: ShapeSpec, resolution: int) -> Image.Image:
    """Render one spec as an RGB ``PIL.Image`` of ``resolution`` x ``resolution``."""
    big = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), spec.background)
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
    """Render ``num_images`` images of ``world`` ("open": captioned, every background;
    "domain": dark background) from ``seed``."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}: expected 'open' or 'domain' (dark)")
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, shape, colour, world) for _ in range(num_images)]
    return [render_spec(s, resolution) for s in specs], specs


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
