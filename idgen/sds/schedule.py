"""Which timesteps score distillation draws, and how much each one counts (``w(t)``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Anneal = Literal["none", "linear", "sqrt"]
Weighting = Literal["sds", "uniform", "fantasia3d"]


@dataclass(frozen=True)
class TimestepSchedule:
    """Uniform timesteps in ``[min_step, max_step]`` (fractions of the training schedule).

    With ``anneal != "none"`` the upper bound moves from ``max_step`` to ``max_step_end`` over the
    run (``progress = step / total_steps``; ``"sqrt"`` moves fast early), so late iterations
    refine details at low noise instead of re-deciding the layout (DreamTime, threestudio's
    ``max_step_percent`` schedules). DreamFusion: ``[0.02, 0.98]``, no annealing.
    """

    min_step: float = 0.02
    max_step: float = 0.98
    anneal: Anneal = "none"
    max_step_end: float = 0.5

    def __post_init__(self) -> None:
        if self.anneal not in ("none", "linear", "sqrt"):
            raise ValueError(f"anneal must be 'none', 'linear' or 'sqrt', got {self.anneal!r}")
        for name in ("min_step", "max_step", "max_step_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TimestepSchedule.{name} must be in [0, 1], got {value}")
        ends = [self.max_step] + ([self.max_step_end] if self.anneal != "none" else [])
        if any(self.min_step > e for e in ends):
            raise ValueError(
                f"TimestepSchedule: min_step={self.min_step} is above the upper bound "
                f"(max_step={self.max_step}, max_step_end={self.max_step_end}); lower min_step"
            )

    def bounds(self, step: int, total_steps: int) -> tuple[float, float]:
        """The ``(low, high)`` fractions in force at optimisation step ``step`` of ``total_steps``."""
        if self.anneal == "none" or total_steps <= 1:
            return self.min_step, self.max_step
        progress = min(max(step / (total_steps - 1), 0.0), 1.0)
        if self.anneal == "sqrt":
            progress = math.sqrt(progress)
        return self.min_step, self.max_step + (self.max_step_end - self.max_step) * progress

    def sample(
        self,
        batch: int,
        num_train_timesteps: int,
        step: int = 0,
        total_steps: int = 1,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``[batch]`` integer timesteps, uniform over the bounds in force (inclusive)."""
        low, high = self.bounds(step, total_steps)
        t_low = int(low * num_train_timesteps)
        t_high = max(int(high * num_train_timesteps), t_low)
        # Draw on the CPU so a CPU generator works for every device, then move.
        t = torch.randint(t_low, t_high + 1, (batch,), generator=generator)
        return t.clamp_max(num_train_timesteps - 1).to(device)


def sds_weight(alphas_cumprod_t: torch.Tensor, weighting: Weighting = "sds") -> torch.Tensor:
    """``w(t)`` from ``alpha_bar_t``: ``"sds"`` = ``1 - alpha_bar`` (DreamFusion), ``"uniform"`` = 1,
    ``"fantasia3d"`` = ``sqrt(alpha_bar) (1 - alpha_bar)`` (down-weights the noisiest steps)."""
    a = alphas_cumprod_t.float()
    if weighting == "sds":
        return 1.0 - a
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "fantasia3d":
        return a.sqrt() * (1.0 - a)
    raise ValueError(f"weighting must be 'sds', 'uniform' or 'fantasia3d', got {weighting!r}")
