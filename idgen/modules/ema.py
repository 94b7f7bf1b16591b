"""Exponential moving average of a model's trainable weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Keeps shadow copies of ``model``'s trainable parameters.

    ``decay`` is the usual EMA factor; with ``warmup`` the effective decay is
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early weights do not dominate.
    ``dtype`` (float32 or bfloat16) and ``device`` (``None``: next to the weights; ``"cpu"``:
    host memory) place the shadow; ``every`` > 1 means :meth:`update` is called every ``every``
    optimizer steps and applies the decay of that many steps (``decay ** every``).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        every: int = 1,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1).")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.every = every
        self.shadow = {
            n: p.detach().to(device=self.device or p.device, dtype=dtype, copy=True)
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        decay = self.decay
        if self.warmup:
            n = self.num_updates
            decay = min(decay, (1 + n) / (10 + n))
        return decay**self.every

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for n, p in model.named_parameters():
            if n in self.shadow:
                s = self.shadow[n]
                if self.device is None and s.device != p.device:
                    s = self.shadow[n] = s.to(p.device)
                s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - decay)
        self.num_updates += 1

    def _swappable(self, model: nn.Module) -> bool:
        """Whether the shadow can trade places with the weights (same dtype and device)."""
        params = dict(model.named_parameters())
        return all(
            s.dtype == params[n].dtype and s.device == params[n].device
            for n, s in self.shadow.items()
        )

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (validation, export).

        A float32 shadow next to the weights trades storage with them (no copy, no memory);
        otherwise the weights are backed up in host memory while the EMA is in.
        """
        if self._swappable(model):
            params = {n: p for n, p in model.named_parameters() if n in self.shadow}
            self._trade(params)
            try:
                yield model
            finally:
                self._trade(params)
            return
        backup = {
            n: p.detach().to("cpu", copy=True)
            for n, p in model.named_parameters()
            if n in self.shadow
        }
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    @torch.no_grad()
    def _trade(self, params: dict[str, nn.Parameter]) -> None:
        for n, p in params.items():
            p.data, self.shadow[n] = self.shadow[n], p.data

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
            s = self.shadow[n]
            self.shadow[n] = state["shadow"][n].to(device=s.device, dtype=s.dtype)
