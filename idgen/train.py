"""idgen-train: compose the config, prepare the data, and train the domain model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from idgen import cli
from idgen.callbacks.ema import EMAWeights
from idgen.data.transforms import to_pil
from idgen.modules.checkpoint_io import (
    AtomicCheckpointIO,
    newest_complete_checkpoint,
    pending_log,
    remove_incomplete_checkpoints,
)
from idgen.preflight import STAGES, base_geometry, validate_train
from idgen.preview import write_base_grid
from idgen.utils.images import make_grid
from idgen.utils.io import atomic_write_text, save_image_atomic
from idgen.utils.log_media import finish_loggers, instantiate_loggers
from idgen.utils.validation import ConfigError, remove_stale_temp_files

log = logging.getLogger(__name__)


def prepare_data(cfg: DictConfig, output_dir: Path) -> L.LightningDataModule:
    """Instantiate the DataModule, scan the folder, write the manifest and a grid of real images."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info(
        "data: %d training images (%d skipped) from %s at %dpx",
        len(datamodule.train_files),
        len(datamodule.skipped),
        datamodule.root,
        datamodule.resolution,
    )
    if rank_zero_only.rank == 0:
        dataset = datamodule.train_dataset
        dataset.transform = datamodule.val_dataset.transform  # no flips in the overview grid
        n = min(16, len(dataset))
        batch = [to_pil(dataset[i]["pixel_values"]) for i in range(n)]
        title = f"training data: {n} of {len(dataset)} images at {datamodule.resolution}px"
        save_image_atomic(make_grid(batch, title=title), output_dir / "data_grid.png")
    return datamodule


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where stage 2 writes its checkpoints (the model_checkpoint callback's ``dirpath``)."""
    node = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if node is not None and node.get("dirpath"):
        return Path(node.dirpath)
    return Path(cfg.paths.output_dir) / "checkpoints"


def resolve_resume(cfg: DictConfig) -> tuple[str | None, int | None]:
    """The checkpoint stage 2 resumes from and its global step (``(None, None)``: a fresh start).

    ``ckpt_path=last`` means the newest *complete* checkpoint in the run's checkpoint folder,
    whatever ``last.ckpt`` says (a kill between writing ``step_N.ckpt`` and ``last.ckpt`` leaves
    the latter behind). Without ``ckpt_path``, a folder that already holds checkpoints is an
    error rather than a second run mixed into the first.
    """
    ckpt = cfg.get("ckpt_path")
    if rank_zero_only.rank == 0:
        remove_incomplete_checkpoints(checkpoint_dir(cfg))
    found = newest_complete_checkpoint(checkpoint_dir(cfg))
    if ckpt == "last":
        if found is None:
            log.info(
                "ckpt_path=last: no complete checkpoint in %s yet; starting fresh",
                checkpoint_dir(cfg),
            )
            return None, None
        log.info("resuming from %s (global step %d)", found[0], found[1])
        return str(found[0]), found[1]
    if ckpt is not None:
        from idgen.modules.checkpoint_io import checkpoint_step

        step = checkpoint_step(ckpt)
        if step is None:
            raise ConfigError(
                "ckpt_path",
                str(ckpt),
                "is not a complete training checkpoint (truncated or not a .ckpt)",
                "Pass ckpt_path=last to take the newest complete one.",
            )
        return str(ckpt), step
    if found is not None:
        raise ConfigError(
            "ckpt_path",
            None,
            f"the run folder's {checkpoint_dir(cfg)} already holds checkpoints (newest: step "
            f"{found[1]}) and a new run would mix with them",
            "Pass ckpt_path=last to resume that run, or a new hydra.run.dir for a new one.",
        )
    return None, None


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the configured stages; returns the final metrics (for sweepers).

    The config is validated first (``idgen.preflight.validate_train``): a user mistake
    fails in milliseconds, before data is scanned or a model built. Leftovers of writes a kill
    interrupted are removed from the run folder, and a rerun into the same folder resumes.
    """
    from idgen.memory.check import plan_or_stop

    # plan=true: the memory plan needs neither the data nor the device (plan a GPU run on a
    # laptop). Otherwise the plan is logged after the checks, and a run that cannot fit stops
    # here with the table, not with an out-of-memory error minutes later.
    if cfg.get("plan") and plan_or_stop(cfg):
        return {}
    validate_train(cfg)
    plan_or_stop(cfg)
    if int(os.environ.get("NODE_RANK") or 0) > 0 and rank_zero_only.rank == 0:
        # A node started by hand in Lightning's multi-node environment (NODE_RANK=1, no RANK)
        # is not rank 0, also before its Trainer says so: the run folder's housekeeping below
        # (temp-file cleanup, config.yaml, grids) stays on node 0.
        rank_zero_only.rank = int(os.environ["NODE_RANK"])
    stage = cfg.get("stage", "all")
    output_dir = Path(cfg.paths.output_dir)
    resume = (None, None)
    if stage in ("finetune", "all"):
        resume = resolve_resume(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        remove_stale_temp_files(output_dir)
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    datamodule = prepare_data(cfg, output_dir)
    sd_loader = instantiate(cfg.model)

    if cfg.preview.enabled and rank_zero_only.rank == 0:
        write_base_grid(
            sd_loader,
            output_dir / "base_grid.png",
            prompts=list(cfg.preview.prompts),
            resolution=cfg.preview.resolution,
            num_inference_steps=cfg.preview.num_inference_steps,
            guidance_scale=cfg.preview.guidance_scale,
            seed=cfg.preview.seed,
        )
    assert stage in STAGES  # validate_train checked it
    metrics: dict[str, float] = {}
    text_features = cfg.get("text_features")
    if stage in ("inversion", "all"):
        done = finished_inversion(cfg, output_dir)
        if done is not None:
            log.info("stage 1 already finished in this run folder: %s (not re-run)", done)
            features_path = done
        else:
            features_path, stage_metrics = run_inversion(cfg, sd_loader, output_dir)
            metrics.update({f"inversion/{k}": v for k, v in stage_metrics.items()})
        text_features = str(features_path)
    if stage in ("finetune", "all"):
        metrics.update(run_finetune(cfg, sd_loader, datamodule, text_features, resume))
    return metrics


def finished_inversion(cfg: DictConfig, output_dir: Path) -> Path | None:
    """Stage 1's result from an earlier (killed or finished) run in this folder, if it matches.

    The file is written atomically at the end of stage 1, so its presence means the stage
    finished. One made with another prompt, step count or base model is never overwritten: that
    is an error naming it.
    """
    from idgen.modules.sd_parts import TEXT_FEATURES_FILE, read_text_features_metadata

    stage_dir = Path(cfg.inversion.get("output_dir") or output_dir / "inversion")
    path = stage_dir / TEXT_FEATURES_FILE
    if not path.is_file():
        return None
    meta = read_text_features_metadata(path)
    expected = {
        "prompt": str(cfg.inversion.prompt_template).format(domain=cfg.inversion.domain),
        "steps": str(int(cfg.inversion_steps)),
        "base_model": str(cfg.inversion.base_model),
    }
    # SD3: the same preset or folder with and without T5 has the same name (see preflight's
    # check_features_base for stage=finetune)
    t5 = base_geometry(cfg.get("model")).get("text_encoder_3")
    if t5 is not None and "text_encoder_3" in meta:
        expected["text_encoder_3"] = "true" if t5 else "false"
    differ = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if differ:
        what = "; ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differ.items())
        raise ConfigError(
            "hydra.run.dir",
            str(output_dir),
            f"holds a finished stage 1 ({path}) made with other settings: {what}",
            "Use a new hydra.run.dir, or reuse it with stage=finetune text_features=<that file>.",
        )
    return path


WANDB_IDS_FILE = "wandb_run_ids.json"


def _wandb_id(output_dir: Path, stage: str, resuming: bool) -> str:
    """The wandb run id of ``stage`` in this run folder: the recorded one when resuming."""
    import json

    path = output_dir / WANDB_IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if not resuming or stage not in ids:
        from wandb.sdk.lib.runid import generate_id

        ids[stage] = generate_id()
        if rank_zero_only.rank == 0:
            atomic_write_text(path, json.dumps(ids, indent=2))
    return ids[stage]


def _loggers(
    cfg: DictConfig,
    suffix: str | None = None,
    resume_step: int | None = None,
    resume_ckpt: str | None = None,
) -> list[Logger]:
    """Loggers for one stage; stage 1's get ``suffix`` in their name so runs stay apart.

    When stage 2 resumes at ``resume_step`` the logs continue: the CSV keeps its rows (those a
    killed run wrote after its checkpoint are dropped, the resumed run writes them again),
    TensorBoard purges events from that step on, and wandb resumes the same run id.
    """
    output_dir = Path(cfg.paths.output_dir)
    pending = pending_log(resume_ckpt) if resume_ckpt else None

    def stage_kwargs(node: DictConfig) -> dict:
        kwargs: dict = {}
        if suffix is not None and "name" in node:
            kwargs["name"] = f"{node.name}_{suffix}" if node.name else suffix
        target = str(node._target_)
        if "wandb" in target.lower() and "id" not in node:
            kwargs["id"] = _wandb_id(output_dir, suffix or "finetune", resume_step is not None)
            kwargs["resume"] = "allow"
        if resume_step is not None and target.endswith("TensorBoardLogger"):
            kwargs["purge_step"] = pending["step"] if pending else resume_step
        return kwargs

    loggers = instantiate_loggers(cfg.get("logger"), stage_kwargs)
    for logger in loggers:
        if resume_step is not None and hasattr(logger, "drop_rows_from"):
            logger.drop_rows_from(resume_step)
            if pending:  # the checkpoint step's own row, if the kill came before it was logged
                logger.restore_row(pending["step"], pending["metrics"])
        elif pending and isinstance(logger, TensorBoardLogger):
            logger.log_metrics(pending["metrics"], step=pending["step"])
    return loggers


# What only stage 2 uses: stage 1 trains text features, which are neither checkpointed (a
# finished stage 1 is reused) nor averaged.
_STAGE2_ONLY = (ModelCheckpoint, EMAWeights)


def _callbacks(cfg: DictConfig, stage2: bool) -> list[L.Callback]:
    """``cfg.callbacks``; without the checkpoints and the EMA for stage 1."""
    nodes = (cfg.get("callbacks") or {}).values()
    callbacks = [instantiate(n) for n in nodes if isinstance(n, DictConfig) and "_target_" in n]
    return [c for c in callbacks if stage2 or not isinstance(c, _STAGE2_ONLY)]


def _plugins(cfg: DictConfig) -> dict:
    """Atomic checkpoint writes unless the trainer config brings its own plugins."""
    if cfg.trainer.get("plugins"):
        return {}
    return {"plugins": [AtomicCheckpointIO()]}


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def run_inversion(cfg: DictConfig, sd_loader, output_dir: Path) -> tuple[Path, dict[str, float]]:
    """Stage 1: optimise the text features; returns the written ``text_features.safetensors``."""
    stage_dir = output_dir / "inversion"
    max_images = cfg.get("inversion_max_images")
    data_kwargs = {"manifest_path": str(stage_dir / "data_manifest.txt")}
    if max_images is not None:
        data_kwargs["max_images"] = min(max_images, cfg.data.get("max_images") or max_images)
    datamodule = instantiate(cfg.data, **data_kwargs)
    module = instantiate(cfg.inversion, model_loader=sd_loader, output_dir=str(stage_dir))
    module.nonfinite_loss = cfg.get("nonfinite_loss", "stop")
    loggers = _loggers(cfg, suffix="inversion")
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(stage_dir),
        max_steps=cfg.inversion_steps,
        max_epochs=-1,
        callbacks=_callbacks(cfg, stage2=False),
        logger=loggers or False,
        enable_checkpointing=False,
        **_plugins(cfg),
    )
    log.info(
        "stage 1: text-feature inversion for %d steps (prompt %r)",
        cfg.inversion_steps,
        module.prompt,
    )
    trainer.fit(module, datamodule=datamodule)
    finish_loggers(loggers)
    return stage_dir / "text_features.safetensors", _metrics(trainer)


def run_finetune(
    cfg: DictConfig,
    sd_loader,
    datamodule: L.LightningDataModule,
    text_features: str | None,
    resume: tuple[str | None, int | None] = (None, None),
) -> dict[str, float]:
    """Stage 2: fine-tune the null-text UNet; exports the domain model at the end.

    ``resume``: the checkpoint and step from :func:`resolve_resume`.
    """
    # other stage-2 modules (baselines) may take no text features
    extra = {"text_features": text_features} if "text_features" in cfg.module else {}
    module = instantiate(cfg.module, model_loader=sd_loader, **extra)
    module.nonfinite_loss = cfg.get("nonfinite_loss", "stop")
    ckpt_path, resume_step = resume
    loggers = _loggers(cfg, resume_step=resume_step, resume_ckpt=ckpt_path)
    trainer = instantiate(
        cfg.trainer,
        callbacks=_callbacks(cfg, stage2=True),
        logger=loggers or False,
        **_plugins(cfg),
    )
    log.info(
        "stage 2: null-text fine-tuning of the domain model from %s",
        text_features or "the encoded prompt",
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if getattr(module, "export_path", None) is not None:
        log.info("domain model: %s", module.export_path)
    finish_loggers(loggers)
    return _metrics(trainer)


# The console script (idgen.cli: nothing heavy is imported before the task and its checks run)
main = cli.train


if __name__ == "__main__":
    main()
