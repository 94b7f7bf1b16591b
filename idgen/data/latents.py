"""Latents for training: encode pixels with the VAE, or read them from an on-disk cache.

With ``cache_latents`` the VAE encodes every training image once (and its mirror image when
``random_flip`` is on); later epochs and later runs read the latent distribution parameters
(mean and log-variance) from a safetensors file keyed by the VAE, resolution and file list,
and sample from them, exactly as encoding on the fly would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


def latents_from_batch(
    batch: dict, vae, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """Scaled latents ``z_0`` for a batch holding ``pixel_values`` or cached ``latent_params``.

    ``shard=(rank, world)``: the batch is rows ``rank, rank + world, ...`` of a global batch;
    the sampling noise is drawn for the global batch and this rank keeps its rows (as
    ``denoising_loss`` does), so a row's latent does not depend on the number of processes.
    """
    if "latent_params" in batch:
        params = batch["latent_params"].to(device=vae.device, dtype=vae.dtype)
        dist = DiagonalGaussianDistribution(params)
    else:
        pixels = batch["pixel_values"].to(device=vae.device, dtype=vae.dtype)
        dist = vae.encode(pixels).latent_dist
    rank, world = shard
    if world == 1:
        latents = dist.sample(generator=generator)
    else:  # what dist.sample draws (randn_tensor on the generator's device), for all rows
        shape = (dist.mean.shape[0] * world, *dist.mean.shape[1:])
        device = generator.device if generator is not None else dist.mean.device
        eps = torch.randn(shape, generator=generator, device=device, dtype=dist.mean.dtype)
        latents = dist.mean + dist.std * eps[rank::world].to(dist.mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def cache_key(files: Sequence[Path], resolution: int, model_id: str, vae) -> str:
    h = hashlib.sha256()
    # "micro": caches also hold each image's size conditioning (older ones are rebuilt)
    h.update(f"{model_id}|{resolution}|micro|".encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    # The weights themselves: a fine-tuned VAE with the same config is a different model.
    for name, tensor in list(vae.state_dict().items())[:4]:
        h.update(name.encode() + tensor.float().flatten()[:64].numpy().tobytes())
    for path in files:
        st = Path(path).stat()
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


#: per-image micro-conditioning kept beside the cached latents (see DomainImageDataset)
MICRO_KEYS = ("original_size", "crop_top_left", "target_size")


@torch.no_grad()
def encode_latent_params(
    dataset: Dataset,
    vae,
    batch_size: int = 8,
    flip: bool = False,
    conditions: dict[str, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """[N, 2C, h, w] latent distribution parameters of every item (mirrored when ``flip``);
    the items' micro-conditioning is appended to ``conditions`` when given."""
    chunks = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if conditions is not None:
            for key in MICRO_KEYS:
                if key in batch:
                    conditions.setdefault(key, []).append(batch[key])
        pixels = batch["pixel_values"].to(device=vae.device, dtype=vae.dtype)
        if flip:
            pixels = torch.flip(pixels, dims=[-1])
        chunks.append(vae.encode(pixels).latent_dist.parameters.float().cpu().contiguous())
    return torch.cat(chunks).contiguous()


def load_or_build_cache(
    cache_dir: str | Path, key: str, dataset: Dataset, vae, with_flips: bool, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    path = Path(cache_dir) / f"latents-{key}.safetensors"
    if path.is_file():
        log.info("data: latent cache hit %s", path)
        return load_file(path)
    log.info("data: encoding %d images once into the latent cache %s", len(dataset), path)
    conditions: dict[str, list[torch.Tensor]] = {}
    tensors = {"params": encode_latent_params(dataset, vae, batch_size, conditions=conditions)}
    tensors |= {k: torch.cat(v) for k, v in conditions.items()}
    if with_flips:
        tensors["params_flipped"] = encode_latent_params(dataset, vae, batch_size, flip=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a killed run never leaves a half cache behind.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return tensors


class CachedLatentDataset(Dataset):
    """``{"latent_params": [2C,h,w], "index": i}``; a random half of the draws are mirrored."""

    def __init__(self, tensors: dict[str, torch.Tensor], random_flip: bool) -> None:
        self.params = tensors["params"]
        self.flipped = tensors.get("params_flipped") if random_flip else None
        self.micro = {k: tensors[k] for k in MICRO_KEYS if k in tensors}

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> dict:
        params = self.params[index]
        if self.flipped is not None and torch.rand(()) < 0.5:
            params = self.flipped[index]
        return {"latent_params": params, "index": index} | {
            k: v[index] for k, v in self.micro.items()
        }
