"""Test-only callbacks injected into idgen-train with ``+callbacks.<name>._target_=...``.

``KillAt`` sends SIGKILL to its own process at a chosen point (a real ``kill -9``: no cleanup,
no finally blocks); ``NaNBatchAt`` makes one batch's pixels NaN so the loss becomes NaN there.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import lightning as L
import torch

import idgen.utils.io as io_module


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """Kill the process at global step ``step``.

    ``where``: ``batch_end`` (after the step, no checkpoint due: mid-epoch work is lost),
    ``ckpt_write`` (half-way through writing ``step_<step>.ckpt``: a partial temp file stays),
    ``before_last`` (``step_<step>.ckpt`` complete, ``last.ckpt`` not yet updated).
    """

    def __init__(self, step: int, where: str = "batch_end") -> None:
        self.step, self.where = step, where

    def on_train_start(self, trainer, pl_module) -> None:
        if self.where not in ("ckpt_write", "before_last"):
            return
        original = io_module.atomic_write_bytes
        target = f"step_{self.step:07d}.ckpt"

        def write(path, data):
            path = Path(path)
            if self.where == "ckpt_write" and path.name == target:
                if callable(data):  # a writer streaming into the open file: its bytes
                    buf = io.BytesIO()
                    data(buf)
                    data = buf.getvalue()
                tmp = path.with_name(f".{path.name}.killed.tmp")
                tmp.write_bytes(data[: len(data) // 2])
                _die()
            if self.where == "before_last" and path.name == "last.ckpt":
                if (path.parent / target).is_file():
                    _die()
            return original(path, data)

        io_module.atomic_write_bytes = write

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step:
            _die()


class NaNBatchAt(L.Callback):
    """Turn the pixels of the batch that makes global step ``step + 1`` into NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["pixel_values"].fill_(torch.nan)
