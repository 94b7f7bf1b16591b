"""FID and KID from precomputed features, computed by torchmetrics itself."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _Precomputed(nn.Module):
    """Identity "extractor": lets torchmetrics consume features we extracted (and cached) once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int, name: str) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"{name}: features must be [N, D] with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    for label, feats in (("reference", real), ("sample", fake)):
        if feats.shape[0] < minimum:
            raise ValueError(
                f"{name} needs at least {minimum} {label} images, got {feats.shape[0]}."
            )


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``real`` and ``fake`` features ([N, D])."""
    _check(real, fake, 2, "FID")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID mean and std over random subsets; ``subset_size`` is capped at the smaller set.

    Returns (mean, std, subset size used). Subsets are drawn with ``seed``, so reruns agree.
    """
    _check(real, fake, 2, "KID")
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": that is the point
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(real, real=True)
    metric.update(fake, real=False)
    # torchmetrics draws subsets with the global RNG: fix it locally without touching the caller's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size
