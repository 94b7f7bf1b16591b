"""A fixed-seed grid from the base model, written before training for a before/after view."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from idgen.utils.images import make_grid
from idgen.utils.io import save_image_atomic

log = logging.getLogger(__name__)


@torch.no_grad()
def write_base_grid(
    sd_loader: Callable[[], StableDiffusionPipeline] | StableDiffusionPipeline,
    out_path: str | Path,
    prompts: Sequence[str],
    resolution: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Path:
    """Sample one image per prompt from the base pipeline (seed ``seed + i``) and save a grid."""
    pipe = (
        sd_loader()
        if callable(sd_loader) and not isinstance(sd_loader, StableDiffusionPipeline)
        else sd_loader
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        out = pipe(
            prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )
        images.append(out.images[0])
    path = save_image_atomic(
        make_grid(
            images,
            ncols=len(images),
            title=f"base model: guidance {guidance_scale:g}, {num_inference_steps} steps, "
            f"seeds {seed}..{seed + len(prompts) - 1}",
            labels=prompts,
        ),
        out_path,
        text={"prompts": " | ".join(prompts), "seed": str(seed), "steps": str(num_inference_steps)},
    )
    log.info("preview: base-model grid of %d prompts -> %s", len(prompts), path)
    return path
