"""Checkpoint writes that are atomic on the target filesystem.

Lightning's default writes through an fsspec transaction whose temp file lives in the system temp
dir; moving it onto another filesystem (a cluster's shared disk) is a copy, so a kill mid-copy
leaves a truncated ``last.ckpt``. Here the temp file sits beside the target and is renamed.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from idgen.utils.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` writing each checkpoint to a same-folder temp file, then renaming."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO does not take storage_options (got {storage_options!r})."
            )
        atomic_torch_save(checkpoint, path)
