"""Logger factories with sensible offline behaviour."""

from __future__ import annotations

import csv
import glob
import io
import logging
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from idgen.utils.io import atomic_write_text
from idgen.utils.log_media import sweep_group

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


# Resolved config snapshots idgen writes into a run dir (eval, sample), then Hydra's own.
RUN_CONFIG_FILES = ("config.yaml", "sample_config.yaml", ".hydra/config.yaml")
# Images written before training starts; logged with the run so the dashboard shows them.
RUN_GRIDS = {
    "data_grid.png": "data: the first training batch (after resize and crop)",
    "base_grid.png": "base model on the preview prompts, before training",
}


def run_config(run_dir: str | os.PathLike) -> dict | None:
    """The full config of the run in ``run_dir`` (resolved when possible), or None."""
    from omegaconf import OmegaConf

    for name in RUN_CONFIG_FILES:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        cfg = OmegaConf.load(path)
        if "hydra" in cfg:
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # e.g. ${hydra:...} outside the app: keep the text as written
            return OmegaConf.to_container(cfg, resolve=False)
    return None


class RunWandbLogger(WandbLogger):
    """``WandbLogger`` whose run carries the whole story of its run dir.

    When the run starts (lazily, at the first log) it records the full config of the run
    (``config.yaml`` / ``sample_config.yaml`` / ``.hydra/config.yaml`` in ``save_dir``) as the
    wandb config, next to the module's hyper-parameters Lightning adds, and logs the data and
    base-model grids found there, captioned.
    """

    @property
    @rank_zero_experiment
    def experiment(self):
        new = self._experiment is None
        # A resumed run (same id, see idgen-train's wandb_run_ids.json) already has the grids.
        run_id = self._wandb_init.get("id")
        resumed = bool(run_id) and bool(
            glob.glob(os.path.join(self.save_dir or ".", "wandb", f"*run-*-{run_id}"))
        )
        run = super().experiment
        if new and run is not None and self.save_dir:
            config = run_config(self.save_dir)
            if config:
                run.config.update(config, allow_val_change=True)
            if not resumed:
                self._log_run_grids(run)
        return run

    def _log_run_grids(self, run) -> None:
        import wandb
        from PIL import Image

        for name, caption in RUN_GRIDS.items():
            path = os.path.join(self.save_dir, name)
            if os.path.isfile(path):
                with Image.open(path) as image:
                    run.log(
                        {f"grids/{name[:-4]}": wandb.Image(image.convert("RGB"), caption=caption)}
                    )


def _default_group(save_dir: str | None) -> str | None:
    """Sweep jobs: the sweep's group; otherwise the run dir's name (the stages of one run)."""
    return sweep_group() or (os.path.basename(os.path.normpath(save_dir)) if save_dir else None)


def _job_suffix() -> str:
    """`` <overrides>`` of a multirun job (e.g. ``sample.w_c=1,sample.w_d=0``); "" otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return f" {HydraConfig.get().job.override_dirname}".rstrip()
    except Exception:  # outside a Hydra app
        pass
    return ""


def wandb_logger(offline: bool | None = None, job_suffix: bool = True, **kwargs) -> WandbLogger:
    """A wandb logger that runs offline (and says so once) when no API key is configured.

    ``group`` defaults to the sweep (multirun jobs) or the run dir (the stages of one training
    run share it); a multirun job's ``name`` gets its overrides (unless ``job_suffix=False``).
    See :class:`RunWandbLogger`.
    """
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
    if kwargs.get("group") is None:
        kwargs["group"] = _default_group(kwargs.get("save_dir"))
    if kwargs.get("name") and job_suffix:
        kwargs["name"] = f"{kwargs['name']}{_job_suffix()}"
    return RunWandbLogger(offline=offline, **kwargs)


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

    @rank_zero_only
    def restore_row(self, step: int, metrics: dict[str, float]) -> bool:
        """Append the row of ``step`` unless ``metrics.csv`` already has its keys at that step."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if os.path.isfile(path):
            with open(path, newline="") as file:
                for row in csv.DictReader(file):
                    same = row.get("step") and int(float(row["step"])) == step
                    if same and all(row.get(k) not in (None, "") for k in metrics):
                        return False
        self.log_metrics(metrics, step=step)
        self.save()
        return True
