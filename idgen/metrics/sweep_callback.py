"""Hydra callback that writes the sweep summary when a multirun ends (and logs it)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from idgen.metrics.sweep_summary import summarize
from idgen.utils.log_media import finish_loggers, instantiate_loggers, log_images, log_table

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    """After ``--multirun``, write summary.csv, summary.md, heatmaps and montage.png into the sweep dir.

    When the sweep config has loggers, the heatmaps, montage and summary table also go to them
    (wandb: one run named ``sweep-summary`` in the sweep's group, files under the sweep dir).
    """

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
        if config.get("logger"):
            log_summary(config, Path(sweep_dir), written)


def log_summary(config: DictConfig, sweep_dir: Path, written: dict[str, Path]) -> None:
    """Heatmaps (captioned with their metric) and the summary table to the sweep's loggers."""
    # Logger configs point at ${paths.output_dir}, which is a job's dir: use the sweep dir.
    cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(sweep_dir)
    loggers = instantiate_loggers(
        cfg.logger, name="sweep-summary", group=sweep_dir.name, job_suffix=False
    )
    heatmaps = {
        k.removeprefix("heatmap_"): p for k, p in written.items() if k.startswith("heatmap_")
    }
    for metric, path in heatmaps.items():
        with Image.open(path) as im:
            log_images(loggers, f"sweep/heatmap_{metric}", [im.convert("RGB")], [path.name])
    if "montage" in written:
        with Image.open(written["montage"]) as im:
            caption = "rows w_d, columns w_c: the first samples of every grid point"
            log_images(loggers, "sweep/montage", [im.convert("RGB")], [caption])
    with open(written["csv"], newline="") as f:
        rows = list(csv.reader(f))
    if rows:
        log_table(loggers, "sweep/summary", rows[0], rows[1:])
    finish_loggers(loggers)
