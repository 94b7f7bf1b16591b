"""Guidance weights: the paper's automatic initial weights and per-term active intervals."""

from __future__ import annotations

import torch


def per_sample_norm(eps: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample's prediction, ``[B, ...] -> [B]`` (computed in float32)."""
    return eps.detach().float().flatten(1).norm(dim=1)


def auto_weight(
    eps_0: torch.Tensor, eps_i: torch.Tensor, w0: float = 7.0, num_terms: int = 2
) -> torch.Tensor:
    """Automatic initial weight ``w_i = w0 / K * |eps_0| / |eps_i|`` per sample, ``[B]``.

    With the paper's two terms (domain + control) ``K = 2`` gives ``w0/2 * |eps_sd| / |eps_i|``, so
    that ``w0 |eps_sd| = w_d |eps_d| + w_c |eps_c|``; with ``K`` terms the same balance holds.
    """
    if num_terms < 1:
        raise ValueError(f"num_terms must be >= 1, got {num_terms}")
    # Guard the division: an all-zero prediction gets weight 0 rather than inf/NaN.
    norm_i = per_sample_norm(eps_i)
    ratio = per_sample_norm(eps_0) / norm_i.clamp_min(torch.finfo(norm_i.dtype).tiny)
    return torch.where(norm_i > 0, w0 / num_terms * ratio, torch.zeros_like(ratio))


def is_active(step_index: int, num_steps: int, start: float = 0.0, end: float = 1.0) -> bool:
    """Whether a term with active interval ``[start, end]`` (fractions of the schedule) is on.

    Step ``i`` of ``N`` covers ``[i/N, (i+1)/N]`` and is on when that span lies inside the interval,
    the same rule as diffusers' ``control_guidance_start/end``.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(
            f"active interval must satisfy 0 <= start <= end <= 1, got [{start}, {end}]"
        )
    return not (step_index / num_steps < start or (step_index + 1) / num_steps > end)
