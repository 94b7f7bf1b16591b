"""Small helpers around the frozen Stable Diffusion parts: freezing, prompt and image encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from idgen.utils.io import atomic_write_bytes

TEXT_FEATURES_KEY = "text_features"
POOLED_FEATURES_KEY = "pooled_text_features"  # SDXL: the pooled embedding beside F^T
TEXT_FEATURES_FILE = "text_features.safetensors"


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


@torch.no_grad()
def encode_images(vae: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (a sample of the posterior) for images in [-1, 1]."""
    posterior = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    latents = posterior.sample() * vae.config.scaling_factor
    return latents.float()


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from scaled latents."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def save_text_features(
    path: str | os.PathLike,
    features: torch.Tensor,
    metadata: dict[str, object],
    pooled: torch.Tensor | None = None,
) -> Path:
    """Write features (and the pooled embedding of families that have one) and string
    metadata to a safetensors file atomically."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {TEXT_FEATURES_KEY: features}
    if pooled is not None:
        tensors[POOLED_FEATURES_KEY] = pooled
    data = save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, meta)
    return atomic_write_bytes(path, data)


def load_text_features(path: str | os.PathLike) -> torch.Tensor:
    """Features [1, T, D] from a file written by :func:`save_text_features` (or a folder holding one)."""
    return _load_features(path)[TEXT_FEATURES_KEY]


def load_pooled_features(path: str | os.PathLike) -> torch.Tensor | None:
    """The pooled embedding [1, P] saved beside the features (None for SD1.5-family files)."""
    return _load_features(path).get(POOLED_FEATURES_KEY)


def _load_features(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        path = path / TEXT_FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"text features file '{path}' does not exist; run stage 1 (stage=inversion) first "
            "or leave text_features unset to start from the encoded prompt."
        )
    tensors = load_file(str(path))
    if TEXT_FEATURES_KEY not in tensors:
        raise KeyError(
            f"'{path}' holds {sorted(tensors)} but no '{TEXT_FEATURES_KEY}' tensor; "
            "is it a text features file written by idgen's inversion stage?"
        )
    return tensors


def read_text_features_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
