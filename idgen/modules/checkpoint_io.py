"""Checkpoint writes that are atomic on the target filesystem.

Lightning's default writes through an fsspec transaction whose temp file lives in the system temp
dir; moving it onto another filesystem (a cluster's shared disk) is a copy, so a kill mid-copy
leaves a truncated ``last.ckpt``. Here the temp file sits beside the target and is renamed.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from idgen.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------- resume and pruning


#: where a checkpoint *folder* keeps its step and metadata: FSDP's sharded checkpoints
#: (``trainer=fsdp``: one file per rank + ``meta.pt``, written last) and DeepSpeed's
#: (``trainer=deepspeed``: the client state beside rank 0's model states, ZeRO-2 / ZeRO-3)
FOLDER_METADATA = (
    "meta.pt",
    "checkpoint/mp_rank_00_model_states.pt",
    "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt",
)


def checkpoint_metadata_file(path: str | os.PathLike) -> Path:
    """The file holding a checkpoint's ``global_step``: ``path`` itself, or inside a checkpoint
    folder (sharded strategies) the first of :data:`FOLDER_METADATA` that exists."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in FOLDER_METADATA if (path / name).is_file()]
        return found[0] if found else path / FOLDER_METADATA[0]
    return path


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The ``global_step`` of a complete checkpoint; ``None`` when it is truncated or not one.

    A file a kill cut short fails here (its zip directory, at the end, is missing), whatever its
    name; ``mmap`` keeps this cheap for big checkpoints (only the pickled header is read). A
    checkpoint folder (FSDP, DeepSpeed) counts once its metadata file is complete.
    """
    path = checkpoint_metadata_file(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        # Our own run folder's files; Lightning itself loads them with weights_only=False.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # a damaged file raises many types: it is simply not complete
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return int(step) if isinstance(step, int) else None


def newest_complete_checkpoint(dirpath: str | os.PathLike) -> tuple[Path, int] | None:
    """The checkpoint in ``dirpath`` with the highest global step that loads, whatever its name.

    ``last.ckpt`` is only one candidate: a kill between writing ``step_N.ckpt`` and ``last.ckpt``
    leaves ``last.ckpt`` one interval behind, and the newer file must win.
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return None
    candidates = []
    for path in dirpath.glob("*.ckpt"):
        if path.name.startswith("."):
            continue
        step = checkpoint_step(path)
        if step is None:
            log.warning("checkpoint %s is incomplete or unreadable; not resuming from it", path)
            continue
        # at equal steps prefer a step file, then the newest write
        candidates.append((step, not path.name.startswith("last"), path.stat().st_mtime, path))
    if not candidates:
        return None
    step, _, _, path = max(candidates)
    return path, step


class ResumableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps exactly ``save_top_k`` files across kills and resumes.

    A checkpoint's callback state is captured while the file is written, before the file it
    replaces in the top-k is deleted; a kill in between leaves that older file outside the
    restored ``best_k_models`` and Lightning never deletes it. At the start of training, files in
    ``dirpath`` at or before the resumed step are adopted back (scored by their global step when
    ``monitor="step"``) and the set is pruned to ``save_top_k``; the checkpoint a run resumed
    from is pruned like the others once newer ones exist (Lightning keeps it forever).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Same step, same content: a resumed run overwrites (atomically) instead of adding
        # last-v1.ckpt / step_N-v1.ckpt next to the files a killed run left.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    _pending_log: dict[str, Any] | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # This step's metrics are logged only after on_train_batch_end (where checkpoints are
        # written): a kill in between would lose that row for good, since the resumed run starts
        # after this step. So the checkpoint carries it, and what is logged so far is flushed.
        if trainer.training:
            logged = trainer._logger_connector.metrics["log"]
            self._pending_log = {
                "step": int(trainer.fit_loop.epoch_loop._batches_that_stepped),
                "metrics": {k: float(v) for k, v in logged.items() if v.numel() == 1}
                | {"epoch": trainer.current_epoch},
            }
            for logger in trainer.loggers:
                logger.save()
        super()._save_checkpoint(trainer, filepath)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending_log": self._pending_log}

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # Lightning never deletes the file a run resumed from; here it is one of this folder's
        # top-k like any other, and it goes only after a newer checkpoint is completely written.
        if previous == current or not self.dirpath:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.monitor != "step" or self.save_top_k < 1 or not self.dirpath:
            return
        if trainer.is_global_zero:
            self._adopt_and_prune(trainer)
        trainer.strategy.barrier("checkpoints_pruned")

    def _adopt_and_prune(self, trainer: L.Trainer) -> None:
        known = {os.path.abspath(p) for p in self.best_k_models}
        for path in Path(self.dirpath).glob("*.ckpt"):
            if path.name.startswith(("last", ".")) or os.path.abspath(path) in known:
                continue
            step = checkpoint_step(path)
            if step is not None and step <= trainer.global_step:
                self.best_k_models[str(path)] = torch.tensor(step)
        # drop any entry whose file is gone (deleted by hand), then the oldest beyond top-k
        self.best_k_models = {p: s for p, s in self.best_k_models.items() if os.path.isfile(p)}
        ranked = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        if self.mode == "min":
            ranked.reverse()
        while len(ranked) > self.save_top_k:
            worst = ranked.pop(0)
            del self.best_k_models[worst]
            if os.path.abspath(worst) != os.path.abspath(self.last_model_path or ""):
                self._remove_checkpoint(trainer, worst)
                log.info("pruned checkpoint %s (keeping the newest %d)", worst, self.save_top_k)
        if ranked:
            self.kth_best_model_path = ranked[0]
            self.kth_value = self.best_k_models[ranked[0]]
            self.best_model_path = ranked[-1]
            self.best_model_score = self.best_k_models[ranked[-1]]


def remove_incomplete_checkpoints(dirpath: str | os.PathLike) -> list[Path]:
    """Delete truncated ``*.ckpt`` files and temp files of interrupted writes in ``dirpath``.

    With :class:`AtomicCheckpointIO` a kill leaves only ``.<name>.<random>.tmp`` files; a
    checkpoint written by another IO plugin may be cut short under its real name. Neither can
    be resumed from, and a truncated ``step_N.ckpt`` would block the resumed run's own file.
    """
    dirpath = Path(dirpath)
    removed: list[Path] = []
    if not dirpath.is_dir():
        return removed
    for path in dirpath.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        # only a file with no zip directory (cut short) goes; one that fails to unpickle for
        # another reason stays for the user to look at (it is just never resumed from)
        truncated = path.suffix == ".ckpt" and path.is_file() and not zipfile.is_zipfile(path)
        if stale_tmp or truncated:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.warning("removed the incomplete checkpoint file %s (an interrupted write)", path)
    return removed


def pending_log(checkpoint_path: str | os.PathLike) -> dict[str, Any] | None:
    """The metrics row of a checkpoint's own step (see ``ResumableModelCheckpoint``), if any."""
    path = checkpoint_metadata_file(checkpoint_path)
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("pending_log"):
            return state["pending_log"]
    return None
