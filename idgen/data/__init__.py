"""Unlabeled domain image folders and the generated demo domain."""

from idgen.data.datamodule import DomainImageDataModule, DomainImageDataset, SkippedImagesWarning
from idgen.data.demo import DemoDomainDataModule, make_demo_domain
from idgen.data.images import UnreadableImage, load_rgb

__all__ = [
    "DemoDomainDataModule",
    "DomainImageDataModule",
    "DomainImageDataset",
    "SkippedImagesWarning",
    "UnreadableImage",
    "load_rgb",
    "make_demo_domain",
]
