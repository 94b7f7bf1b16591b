"""Mixing noise predictions from several guidance sources (paper Eq. 3 and §3.4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Weight = float | torch.Tensor


def _as_batch_weight(w: Weight, like: torch.Tensor) -> Weight:
    """A float stays a float (bit-exact with diffusers' CFG); a per-sample [B] tensor broadcasts."""
    if isinstance(w, torch.Tensor):
        if w.ndim == 0:
            return w.to(like.dtype)
        return w.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return float(w)


def multi_guidance(
    eps_0: torch.Tensor, eps_terms: Sequence[torch.Tensor], weights: Sequence[Weight]
) -> torch.Tensor:
    """General K-term guidance ``eps_0 + sum_i w_i (eps_i - eps_0)`` (paper Eq. 3).

    ``eps_0`` is the unconditional prediction; each weight is a float or a per-sample ``[B]`` tensor.
    """
    if len(eps_terms) != len(weights):
        raise ValueError(f"got {len(eps_terms)} predictions but {len(weights)} weights")
    out = eps_0
    for eps_i, w_i in zip(eps_terms, weights, strict=True):
        out = out + _as_batch_weight(w_i, eps_0) * (eps_i - eps_0)
    return out


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: Weight) -> torch.Tensor:
    """Classifier-free guidance ``eps_u + s (eps_c - eps_u)``, the one-term case of Eq. 3."""
    return multi_guidance(eps_uncond, [eps_cond], [scale])


def decoupled_guidance(
    eps_sd_uncond: torch.Tensor,
    eps_domain: torch.Tensor,
    eps_control: torch.Tensor,
    w_d: Weight,
    w_c: Weight,
) -> torch.Tensor:
    """The paper's three-term form ``(1 - w_d - w_c) eps_sd(z,"") + w_d eps_d(z) + w_c eps_c(z, c)``."""
    w_d = _as_batch_weight(w_d, eps_sd_uncond)
    w_c = _as_batch_weight(w_c, eps_sd_uncond)
    return (1 - w_d - w_c) * eps_sd_uncond + w_d * eps_domain + w_c * eps_control
