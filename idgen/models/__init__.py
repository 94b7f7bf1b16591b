"""Stable Diffusion loading, the model families, the tiny presets and the null-text domain models."""

from idgen.models.family import FAMILIES, FamilyError, ModelFamily, family_named, family_of
from idgen.models.loading import SDLoadError, load_sd, missing_parts
from idgen.models.null_text_transformer import NullTextSD3Transformer
from idgen.models.null_text_unet import NullTextUNet
from idgen.models.tiny import build_tiny_sd
from idgen.models.tiny_sd3 import build_tiny_sd3
from idgen.models.tiny_sdxl import build_tiny_sdxl

__all__ = [
    "FAMILIES",
    "FamilyError",
    "ModelFamily",
    "NullTextSD3Transformer",
    "NullTextUNet",
    "SDLoadError",
    "build_tiny_sd",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "family_named",
    "family_of",
    "load_sd",
    "missing_parts",
]
