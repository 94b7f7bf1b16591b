"""The embedded demo domain: procedural coloured shapes on a dark background.

One recognisable kind of image (a single red/green/blue/yellow circle, square or triangle
on a near-black background), rendered deterministically from a seed, so the README's main
job needs no download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from idgen.data.datamodule import DomainImageDataModule
from idgen.toyworld.render import COLOURS, SHAPES, render_world
from idgen.utils.io import atomic_write_text, save_image_atomic

__all__ = ["COLOURS", "SHAPES", "DemoDomainDataModule", "make_demo_domain"]


def make_demo_domain(
    root: str | os.PathLike, num_images: int = 256, resolution: int = 64, seed: int = 0
) -> Path:
    """Write the demo domain folder (idempotent: an existing complete folder is kept)."""
    root = Path(root)
    done = root / "demo_domain.json"
    # version 2: rendered by idgen.toyworld (the one renderer of the toy world).
    spec = {"num_images": num_images, "resolution": resolution, "seed": seed, "version": 2}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return root
    images, specs = render_world("domain", num_images, resolution, seed)
    for i, (image, s) in enumerate(zip(images, specs, strict=True)):
        save_image_atomic(image, root / f"{i:05d}_{s.colour}_{s.shape}.png")
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
