"""The toy world: a CPU-sized world where the method's claims can be checked.

``render``: seeded open-world (light, captioned) and domain (dark, unlabeled) images.
``metrics``: pixel-statistics colour/shape/no-object/dark-background scores.
``demo``: the embedded demo domain (a folder of the domain's images) and its ``DataModule``.
``pretrain``: the recipe of the toy base model shipped under ``idgen/toyworld/base``.
"""

from pathlib import Path

from idgen.toyworld.metrics import read_image, score
from idgen.toyworld.render import (
    COLOURS,
    SHAPES,
    all_captions,
    caption,
    render_batch,
    render_world,
)

# The shipped pretrained toy base, a diffusers folder: ``idgen.models.load_sd(BASE_DIR)``.
BASE_DIR = Path(__file__).parent / "base"

__all__ = [
    "BASE_DIR",
    "COLOURS",
    "SHAPES",
    "all_captions",
    "caption",
    "read_image",
    "render_batch",
    "render_world",
    "score",
]
