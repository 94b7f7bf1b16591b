"""Stable Diffusion loading, the model families, the tiny presets and the null-text domain models.

Everything is imported on first use (``from idgen.models import NullTextUNet`` works as
before): the config checks import ``idgen.models.single_file`` / ``loading`` without paying
for every family's diffusers classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from idgen.models.family import FAMILIES, FamilyError, ModelFamily, family_named, family_of
    from idgen.models.loading import SDLoadError, load_sd, missing_parts
    from idgen.models.null_text_transformer import NullTextSD3Transformer
    from idgen.models.null_text_unet import NullTextUNet
    from idgen.models.tiny import build_tiny_sd
    from idgen.models.tiny_sd3 import build_tiny_sd3
    from idgen.models.tiny_sdxl import build_tiny_sdxl

_LAZY = {
    "FAMILIES": "idgen.models.family",
    "FamilyError": "idgen.models.family",
    "ModelFamily": "idgen.models.family",
    "family_named": "idgen.models.family",
    "family_of": "idgen.models.family",
    "SDLoadError": "idgen.models.loading",
    "load_sd": "idgen.models.loading",
    "missing_parts": "idgen.models.loading",
    "NullTextSD3Transformer": "idgen.models.null_text_transformer",
    "NullTextUNet": "idgen.models.null_text_unet",
    "build_tiny_sd": "idgen.models.tiny",
    "build_tiny_sd3": "idgen.models.tiny_sd3",
    "build_tiny_sdxl": "idgen.models.tiny_sdxl",
}

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
