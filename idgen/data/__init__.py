"""Unlabeled domain image folders: the DataModule, its dataset and the one image loader.

The embedded demo domain (the toy world's dark images) is ``idgen.toyworld.demo``.
"""

from idgen.data.datamodule import DomainImageDataModule, DomainImageDataset, SkippedImagesWarning
from idgen.data.images import UnreadableImage, load_rgb

__all__ = [
    "DomainImageDataModule",
    "DomainImageDataset",
    "SkippedImagesWarning",
    "UnreadableImage",
    "load_rgb",
]
