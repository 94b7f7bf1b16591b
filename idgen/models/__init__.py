"""Stable Diffusion loading, the tiny preset and the null-text domain UNet."""

from idgen.models.loading import SDLoadError, load_sd, missing_parts
from idgen.models.null_text_unet import NullTextUNet
from idgen.models.tiny import build_tiny_sd

__all__ = ["NullTextUNet", "SDLoadError", "build_tiny_sd", "load_sd", "missing_parts"]
