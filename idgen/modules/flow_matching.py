"""The flow-matching training loss of SD3-family bases (rectified flow, velocity target).

SD3 is trained on the straight path ``z_s = (1 - s) z_0 + s eps`` between data and noise; the
transformer predicts the velocity ``v = eps - z_0`` at ``timestep = 1000 s``. Sigmas are drawn
as SD3 draws them (logit-normal by default, diffusers' ``compute_density_for_timestep_sampling``)
and read from the scheduler's training table, so SD3's ``shift`` applies as in diffusers'
SD3 training scripts; ``compute_loss_weighting_for_sd3`` weights the loss (none by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from idgen.modules.diffusion_loss import sample_noise, weighted_mse

#: SD3's defaults (diffusers' train_dreambooth_sd3.py): logit-normal(0, 1) sigmas, no weighting
TIMESTEP_SAMPLING: dict[str, Any] = dict(
    weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29
)
#: how sigmas are drawn (``compute_density_for_timestep_sampling``'s ``weighting_scheme``)
TIMESTEP_SCHEMES = ("logit_normal", "mode", "uniform")
#: how the loss is weighted per sigma (``compute_loss_weighting_for_sd3``)
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
#: the options a stage's ``flow_matching`` block may set (``idgen/conf/module/*.yaml``)
OPTIONS = (*TIMESTEP_SAMPLING, "loss_weighting")


def flow_matching_options(options: Any = None) -> dict[str, Any]:
    """The keyword arguments of :func:`flow_matching_loss` from a stage's ``flow_matching``
    block (a mapping; ``None`` values keep SD3's default), as a plain ``dict``.

    Raises ``ValueError`` for an unknown option or scheme: diffusers falls back to uniform
    sampling and no weighting for a name it does not know, so a typo would train silently.
    """
    given = {k: v for k, v in dict(options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"flow_matching: unknown option(s) {unknown}; use {list(OPTIONS)}.")
    for key, choices in (
        ("weighting_scheme", TIMESTEP_SCHEMES),
        ("loss_weighting", LOSS_WEIGHTINGS),
    ):
        if key in given and given[key] not in choices:
            raise ValueError(f"flow_matching.{key}={given[key]!r}: use one of {list(choices)}.")
    return {
        k: float(v) if k in ("logit_mean", "logit_std", "mode_scale") else str(v)
        for k, v in given.items()
    }


def flow_sigmas(scheduler_config: Any) -> torch.Tensor:
    """The training sigmas of a flow-matching scheduler config (descending, ``shift`` applied),
    from a fresh scheduler: a pipeline's own may have been ``set_timesteps``'d for sampling."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    return scheduler.sigmas.float().clone()


def flow_matching_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    shard: tuple[int, int] = (0, 1),
    loss_weighting: str = "none",
    **timestep_sampling: Any,
) -> torch.Tensor:
    """The flow-matching loss ``|v(z_s, 1000 s) - (eps - z_0)|^2`` for one batch of latents.

    ``sigmas``: :func:`flow_sigmas` (``num_train_timesteps`` values, 1 -> ~0). ``shard``: as
    :func:`~idgen.modules.diffusion_loss.denoising_loss` (draws for the global batch, this
    rank's rows). ``timestep_sampling`` overrides :data:`TIMESTEP_SAMPLING`
    (``weighting_scheme="logit_normal" | "mode" | "uniform"``, ``logit_mean``, ``logit_std``,
    ``mode_scale``); ``loss_weighting``: ``"none"``, ``"sigma_sqrt"`` or ``"cosmap"``.
    """
    # 1. Draw noise and sigmas (for the global batch; this rank's rows).
    rank, world = shard
    rows = slice(rank, None, world)
    full = torch.empty((latents.shape[0] * world, *latents.shape[1:]), dtype=latents.dtype)
    noise = sample_noise(full, generator, noise_offset)[rows].to(latents.device)
    options = TIMESTEP_SAMPLING | timestep_sampling
    u = compute_density_for_timestep_sampling(
        batch_size=full.shape[0], generator=generator, **options
    )[rows]
    num_train = sigmas.shape[0]
    indices = (u * num_train).long().clamp(0, num_train - 1)
    sigma = sigmas[indices].to(latents.device)
    s = sigma.reshape(-1, *([1] * (latents.ndim - 1)))
    # 2. The straight path, the prediction at timestep 1000 s, and its velocity target.
    noisy = ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)
    pred = predict(noisy, sigma * num_train)
    target = noise.float() - latents.float()
    return weighted_mse(pred, target, compute_loss_weighting_for_sd3(loss_weighting, sigma))
