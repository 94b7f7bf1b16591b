"""Loggers for idgen-sample / idgen-eval / sweeps: one call sends images, tables and series to
whichever loggers were chosen (wandb, TensorBoard, CSV), and runs of one sweep share a group.

Images: wandb images with captions; TensorBoard images with the caption as text; CSV keeps
numbers only (the images are on disk). Tables: a wandb Table; elsewhere one metrics row each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig
from PIL import Image

GROUP_ENV = "IDGEN_WANDB_GROUP"  # set by idgen-eval for the idgen-sample it starts


def sweep_group() -> str | None:
    """wandb group of this run: ``$IDGEN_WANDB_GROUP``, else the Hydra sweep dir's name."""
    if os.environ.get(GROUP_ENV):
        return os.environ[GROUP_ENV]
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hydra.sweep.dir)).name


def instantiate_loggers(
    logger_cfg: DictConfig | None,
    node_kwargs: Callable[[DictConfig], dict[str, Any]] | None = None,
    **wandb_kwargs: Any,
) -> list[Logger]:
    """The configured loggers (every CLI's one helper); a wandb logger without a group joins
    the sweep's group. ``node_kwargs(node)`` adds arguments per logger (idgen-train: the stage
    name, the resumed wandb id, TensorBoard's purge step)."""
    if not logger_cfg:
        return []
    group = sweep_group()
    loggers = []
    for node in logger_cfg.values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        kwargs: dict[str, Any] = {}
        if "group" in node:  # the wandb config (idgen/conf/logger/wandb.yaml)
            kwargs = dict(wandb_kwargs)
            if node.group is None and group and "group" not in kwargs:
                kwargs["group"] = group
        if node_kwargs is not None:
            kwargs.update(node_kwargs(node))
        loggers.append(instantiate(node, **kwargs))
    return loggers


def finish_loggers(loggers: Iterable[Logger]) -> None:
    """Flush every logger; end wandb runs so the next job of a sweep gets a run of its own."""
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def log_images(
    loggers: Iterable[Logger],
    key: str,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    step: int = 0,
) -> None:
    """Images with captions: wandb images, TensorBoard images (+ caption as text)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=list(images), caption=list(captions), step=step)
        elif isinstance(logger, TensorBoardLogger):
            for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
                tag = f"{key}/{i}"
                array = np.asarray(image.convert("RGB"))
                logger.experiment.add_image(tag, array, step, dataformats="HWC")
                logger.experiment.add_text(tag, caption, step)


def log_table(
    loggers: Iterable[Logger], key: str, columns: Sequence[str], rows: Sequence[Sequence]
) -> None:
    """A small table: a wandb Table (other loggers get the numbers through ``log_series``)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])


def log_series(loggers: Iterable[Logger], series: Sequence[Mapping[str, float]]) -> None:
    """One metrics row per entry, at ``step`` = its position (e.g. the denoising step)."""
    for logger in loggers:
        for step, row in enumerate(series):
            logger.log_metrics(dict(row), step=step)
