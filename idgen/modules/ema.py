"""Exponential moving average of a model's trainable weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Keeps fp32 shadow copies of ``model``'s trainable parameters.

    ``decay`` is the usual EMA factor; with ``warmup`` the effective decay is
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early weights do not dominate.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1).")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for n, p in model.named_parameters():
            if n in self.shadow:
                s = self.shadow[n]
                if s.device != p.device:
                    s = self.shadow[n] = s.to(p.device)
                s.lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (validation, export)."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: s.detach().cpu() for n, s in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        for n in self.shadow:
            self.shadow[n] = state["shadow"][n].float().to(self.shadow[n].device)
