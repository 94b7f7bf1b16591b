"""EMA of the trained weights as a Lightning callback (``idgen/conf/callbacks/ema.yaml``).

The averaging itself is :class:`idgen.modules.ema.EMA`. Lightning's ``WeightAveraging`` and
diffusers' ``EMAModel`` were not used: the first deep-copies the whole module (frozen VAE
included) and keeps its state in ``checkpoint["callbacks"]``, the second has another state
format; either would break resuming (and ``python -m idgen.modules.export``) from existing
checkpoints, whose EMA is the top-level ``checkpoint["ema"]`` written here.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateFinder
from torch import nn

from idgen.modules.ema import EMA

CHECKPOINT_KEY = "ema"


class EMAWeights(Callback):
    """Keeps an :class:`EMA` of the module's ``ema_target()`` and hands it to the module.

    The module must define ``ema_target() -> nn.Module`` (what to average) and read its ``ema``
    attribute, which this callback sets, for validation and export (``NullTextFinetuneModule``
    swaps it in through ``export_weights_context()``). Without this callback the module keeps
    ``ema = None`` and uses its raw weights.

    Args:
        decay: the EMA factor, in [0, 1).
        warmup: ramp the decay up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.
        placement: ``device`` (next to the weights), ``cpu`` (host memory) or ``off`` (this
            callback does nothing: raw weights everywhere). ``memory.ema`` sets it.
        dtype: the shadow's dtype, ``float32`` or ``bfloat16`` (``memory.ema_dtype``).
        every_n_steps: update every k optimizer steps with the decay of k steps
            (``memory.ema_every``).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        placement: str | bool = "device",
        dtype: str = "float32",
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ValueError(
                f"callbacks.ema.decay={decay!r} must be a number in [0, 1); "
                "to train without EMA pass ~callbacks.ema (or callbacks.ema=null)."
            )
        placement = "off" if placement is False else placement
        if placement not in ("device", "cpu", "off"):
            raise ValueError(f"memory.ema={placement!r}: use device, cpu or off.")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"memory.ema_dtype={dtype!r}: use float32 or bfloat16.")
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(f"memory.ema_every={every_n_steps!r} must be an integer >= 1.")
        # bfloat16 holds 8 significant bits: a step smaller than 1/256 of the weight rounds
        # away, and the EMA would never move.
        if dtype == "bfloat16" and 1 - float(decay) ** every_n_steps < 2**-8:
            needed = next(k for k in range(1, 10**6) if 1 - float(decay) ** k >= 2**-8)
            raise ValueError(
                f"memory.ema_dtype=bfloat16 with decay {decay} and memory.ema_every="
                f"{every_n_steps}: each update moves the EMA by less than bfloat16 can hold "
                f"(1/256), so it would never change; use memory.ema_every={needed} or more, "
                "or memory.ema_dtype=float32."
            )
        self.decay = float(decay)
        self.warmup = warmup
        self.placement = placement
        self.dtype = getattr(torch, dtype)
        self.every_n_steps = every_n_steps
        self.ema: EMA | None = None
        # a checkpoint's EMA state read before the EMA exists (Lightning restores callbacks
        # before on_fit_start, unless the strategy restores after setup)
        self._pending: dict | None = None
        self._last_step = 0

    @staticmethod
    def target(pl_module: L.LightningModule) -> nn.Module:
        """The module's ``ema_target()``; a clear error when it has none."""
        getter = getattr(pl_module, "ema_target", None)
        target = getter() if callable(getter) else None
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"callbacks.ema (EMAWeights) needs a module with ema_target() -> nn.Module, "
                f"which {type(pl_module).__name__} does not provide; remove the callback with "
                "~callbacks.ema (or callbacks.ema=null)."
            )
        return target

    # --- order ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.placement == "off":
            return
        # Run this on_train_batch_end before the other callbacks' (Lightning keeps tuners first
        # and ModelCheckpoint last): validation grids drawn at step k must see the EMA of step
        # k, whatever order the callbacks were configured in. A new list, so the hook loop that
        # is calling us goes on over the old one.
        others = [c for c in trainer.callbacks if c is not self]
        tuners = [c for c in others if isinstance(c, BatchSizeFinder | LearningRateFinder)]
        rest = [c for c in others if not isinstance(c, BatchSizeFinder | LearningRateFinder)]
        trainer.callbacks = [*tuners, self, *rest]

    # --- create and update ------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Created here, after DDP has broadcast rank 0's weights, so every rank's EMA agrees.
        if self.placement == "off":
            return
        target = self.target(pl_module)
        if getattr(pl_module, "ema", None) is None:  # a second fit continues the first's EMA
            device = "cpu" if self.placement == "cpu" else None
            pl_module.ema = EMA(
                target, self.decay, self.warmup, self.dtype, device, self.every_n_steps
            )
        self.ema = pl_module.ema
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # global_step is restored from a checkpoint only after on_fit_start
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *batch_end: Any
    ) -> None:
        # batch_end (outputs, batch, batch_idx) is not needed. Once per optimizer step:
        # global_step advances after each call of optimizer_step (also one whose update the
        # non-finite guard dropped), not on the batches that only accumulate gradients.
        # Callbacks' on_train_batch_end runs before ModelCheckpoint's and the module's, so the
        # checkpoint of step k holds the EMA of step k.
        if self.ema is None or trainer.global_step <= self._last_step:
            return
        if trainer.global_step - self._last_step < self.every_n_steps:
            return
        self._last_step = trainer.global_step
        self.ema.update(self.target(pl_module))

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # top level, not under "callbacks": the format of existing checkpoints, read by
        # idgen.modules.export without Lightning
        checkpoint[CHECKPOINT_KEY] = self.ema.state_dict() if self.ema is not None else None

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if self.ema is not None:
            self.ema.load_state_dict(state)
        else:
            self._pending = state
