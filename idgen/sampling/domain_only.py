"""A minimal sampler for the domain model alone (its own unconditional prediction)."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import nn


@torch.no_grad()
def sample_domain_model(
    domain_unet: nn.Module,
    vae: nn.Module,
    scheduler_config: dict,
    num_images: int = 4,
    num_inference_steps: int = 20,
    seed: int = 0,
    latent_size: int | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] sampled with ``eps_d(z_t)`` only (DPM-Solver++).

    Same seed, same images: the fine-tuning module's quick fixed-seed grid of the domain model.
    """
    param = next(domain_unet.parameters())
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    size = latent_size or domain_unet.config.unet_config["sample_size"]
    channels = domain_unet.config.unet_config["in_channels"]
    generator = torch.Generator().manual_seed(seed)

    # 1. Initial noise, drawn on the CPU so every device and rank gets the same grid.
    latents = torch.randn((num_images, channels, size, size), generator=generator)
    latents = latents.to(param.device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=param.device)

    # 2. Denoising loop.
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = domain_unet(model_input.to(param.dtype), t).sample.float()
        latents = scheduler.step(eps, t, latents).prev_sample

    # 3. Decode. (Imported here: idgen.modules imports this file for its validation grid.)
    from idgen.modules.sd_parts import decode_latents

    return decode_latents(vae, latents)


def make_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Tile [N, 3, H, W] images into one [3, rows*H, cols*W] image."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(round(n**0.5)))
    rows = (n + nrow - 1) // nrow
    grid = images.new_zeros(c, rows * h, nrow * w)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    return grid


def to_pil(image: torch.Tensor):
    """A [3, H, W] image in [0, 1] as a PIL image."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
