"""Hydra callback that writes the sweep summary when a multirun ends."""

from __future__ import annotations

import logging

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from idgen.metrics.sweep_summary import summarize

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    """After ``--multirun``, write summary.csv, summary.md and heatmaps into the sweep dir."""

    def __init__(self, x: str | None = None, y: str | None = None) -> None:
        self.x, self.y = x, y

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        try:
            written = summarize(sweep_dir, self.x, self.y)
        except (
            FileNotFoundError
        ) as err:  # e.g. every job failed: say so, do not hide the jobs' errors
            log.warning("no sweep summary: %s", err)
            return
        log.info("sweep summary: %s", ", ".join(str(p) for p in written.values()))
