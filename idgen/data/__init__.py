"""Unlabeled domain image folders: the DataModule, its dataset and the one image loader.

The embedded demo domain (the toy world's dark images) is ``idgen.toyworld.demo``.
The DataModule (Lightning, torch) is imported on first use: the config checks read only
``idgen.data.images`` and must not pay for Lightning (``idgen-train --help`` stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from idgen.data.images import UnreadableImage, load_rgb

if TYPE_CHECKING:
    from idgen.data.datamodule import (
        DomainImageDataModule,
        DomainImageDataset,
        SkippedImagesWarning,
    )

_LAZY = {
    "DomainImageDataModule": "idgen.data.datamodule",
    "DomainImageDataset": "idgen.data.datamodule",
    "SkippedImagesWarning": "idgen.data.datamodule",
}

__all__ = [
    "DomainImageDataModule",
    "DomainImageDataset",
    "SkippedImagesWarning",
    "UnreadableImage",
    "load_rgb",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
