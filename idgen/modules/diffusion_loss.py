"""The denoising loss shared by feature inversion and null-text fine-tuning (pure tensor math)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator | None = None, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant shift.

    The offset (Guttenberg's "noise offset") lets the model learn to change an image's mean
    brightness, which plain i.i.d. noise almost never exposes.
    """
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        offset = torch.randn((b, c) + (1,) * (latents.ndim - 2), generator=generator)
        noise = noise + noise_offset * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(timesteps.device)[timesteps].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def add_noise(
    alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Forward process ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps`` (as DDPMScheduler.add_noise)."""
    a = _gather(alphas_cumprod, t, latents.ndim)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def denoising_target(
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """What the model should predict: eps, ``v = sqrt(a) eps - sqrt(1-a) z_0``, or ``z_0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, t, latents.ndim)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"scheduler prediction_type={prediction_type!r} is not supported; "
        f"use one of {PREDICTION_TYPES}."
    )


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` per timestep."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) expressed for the model's prediction type.

    The weight on the x0-error is ``min(snr, gamma)``; converted to eps-error it is divided by
    ``snr``, to v-error by ``snr + 1``.
    """
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    return clipped


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in fp32, optionally weighted per sample."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights.to(per_sample)).mean()


def denoising_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """The standard latent-diffusion training loss for one batch of clean latents.

    ``predict(noisy_latents, timesteps)`` is the model's output. Noise and timesteps are drawn
    from ``generator`` (CPU) so runs are reproducible and resumable. ``shard=(rank, world)``:
    ``latents`` are rows ``rank, rank + world, ...`` of a global batch ``world`` times larger
    (what ``EpochSeededSampler`` hands each DDP rank); the draws are made for the global batch
    and this rank keeps its rows, so with the same ``generator`` on every rank each image gets
    the noise and timestep of a one-process run, whatever the number of processes.
    """
    # 1. Draw noise and timesteps (for the global batch; this rank's rows).
    rank, world = shard
    rows = slice(rank, None, world)
    full = torch.empty((latents.shape[0] * world, *latents.shape[1:]), dtype=latents.dtype)
    noise = sample_noise(full, generator, noise_offset)[rows].to(latents.device)
    t = sample_timesteps(full.shape[0], alphas_cumprod.shape[0], generator)[rows]
    t = t.to(latents.device)
    # 2. Forward process, prediction and its target.
    noisy = add_noise(alphas_cumprod, latents, noise, t)
    pred = predict(noisy, t)
    target = denoising_target(prediction_type, alphas_cumprod, latents, noise, t)
    # 3. Optional min-SNR weighting.
    weights = None
    if snr_gamma is not None:
        weights = min_snr_weights(snr(alphas_cumprod, t), snr_gamma, prediction_type)
    return weighted_mse(pred, target, weights)
