"""Small helpers around the frozen Stable Diffusion parts: freezing, prompt and image encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from idgen.models.text import encode_text
from idgen.utils.io import atomic_write_bytes

TEXT_FEATURES_KEY = "text_features"
TEXT_FEATURES_FILE = "text_features.safetensors"


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder: nn.Module, prompt: str) -> torch.Tensor:
    """The text encoder's output features for ``prompt``: [1, max_length, D] in fp32."""
    return encode_text(tokenizer, text_encoder, [prompt]).float()


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
    path: str | os.PathLike, features: torch.Tensor, metadata: dict[str, object]
) -> Path:
    """Write features and string metadata to a safetensors file atomically."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = save({TEXT_FEATURES_KEY: features.detach().float().cpu().contiguous()}, metadata=meta)
    return atomic_write_bytes(path, data)


def load_text_features(path: str | os.PathLike) -> torch.Tensor:
    """Features [1, T, D] from a file written by :func:`save_text_features` (or a folder holding one)."""
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
    return tensors[TEXT_FEATURES_KEY]


def read_text_features_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
