"""Logger factories with sensible offline behaviour."""

from __future__ import annotations

import csv
import io
import logging
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from idgen.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def wandb_has_key() -> bool:
    """Whether wandb can authenticate (env var or a stored `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.setup().settings.api_key)
    except Exception:
        return False


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline (and says so once) when no API key is configured."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun", "disabled") or not wandb_has_key()
        if offline and mode not in ("offline", "dryrun", "disabled"):
            log.warning(
                "wandb: no API key configured, logging offline to %s (sync later with `wandb sync`).",
                kwargs.get("save_dir", "."),
            )
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return WandbLogger(offline=offline, **kwargs)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                # later rows are appended under this header (rewritten if new keys come)
                self.metrics_keys = list(next(csv.reader(file), []))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume (Lightning's deletes it on start).

    A resumed run calls :meth:`drop_rows_from` with the step it resumes at, so the rows a killed
    run logged after its last checkpoint are replaced by the resumed run's, not doubled.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def drop_rows_from(self, step: int) -> int:
        """Remove rows logged at ``step`` or later; returns how many were removed."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(keep) != len(rows):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=fields)
            writer.writeheader()
            writer.writerows(keep)
            atomic_write_text(path, buf.getvalue())
        return len(rows) - len(keep)
