"""The embedded demo domain: procedural coloured shapes on a dark background.

One recognisable kind of image (a single red/green/blue/yellow circle, square or triangle
on a near-black background), rendered deterministically from a seed, so the README's main
job needs no download.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from idgen.data.datamodule import DomainImageDataModule
from idgen.utils.io import atomic_write_text, save_image_atomic

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
_SUPERSAMPLE = 4


def render_shape(
    shape: str,
    colour: str,
    resolution: int = 64,
    background: tuple[int, int, int] = (20, 20, 28),
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Render one shape with a random size, position and rotation (anti-aliased)."""
    rng = rng or np.random.default_rng(0)
    big = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    radius = big * rng.uniform(0.18, 0.3)
    cx, cy = (big / 2 + rng.uniform(-0.15, 0.15, size=2) * big).tolist()
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        sides = 4 if shape == "square" else 3
        angle = rng.uniform(0, 2 * math.pi)
        points = [
            (
                cx + radius * math.cos(angle + 2 * math.pi * k / sides),
                cy + radius * math.sin(angle + 2 * math.pi * k / sides),
            )
            for k in range(sides)
        ]
        draw.polygon(points, fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def make_demo_domain(
    root: str | os.PathLike, num_images: int = 256, resolution: int = 64, seed: int = 0
) -> Path:
    """Write the demo domain folder (idempotent: an existing complete folder is kept)."""
    root = Path(root)
    done = root / "demo_domain.json"
    spec = {"num_images": num_images, "resolution": resolution, "seed": seed, "version": 1}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        image = render_shape(shape, colour, resolution, rng=rng)
        save_image_atomic(image, root / f"{i:05d}_{colour}_{shape}.png")
    atomic_write_text(done, json.dumps(spec))
    return root


class DemoDomainDataModule(DomainImageDataModule):
    """``DomainImageDataModule`` over the generated demo domain, created in ``prepare_data``."""

    def __init__(self, root: str, num_images: int = 256, generate_seed: int = 0, **kwargs) -> None:
        kwargs.setdefault("resolution", 64)
        super().__init__(root=root, **kwargs)
        self.num_images = num_images
        self.generate_seed = generate_seed

    def prepare_data(self) -> None:
        make_demo_domain(self.root, self.num_images, self.resolution, self.generate_seed)

    def setup(self, stage: str | None = None) -> None:
        # Also usable outside a Trainer (notebooks), where prepare_data is not called for us.
        if not Path(self.root, "demo_domain.json").is_file():
            self.prepare_data()
        super().setup(stage)
