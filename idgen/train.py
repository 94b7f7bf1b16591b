"""idgen-train: compose the config, prepare the data, and train the domain model."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from idgen import CONFIG_DIR
from idgen.data.transforms import to_pil
from idgen.modules.checkpoint_io import AtomicCheckpointIO
from idgen.preview import write_base_grid
from idgen.utils.images import make_grid
from idgen.utils.io import atomic_write_text, save_image_atomic

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
        save_image_atomic(make_grid(batch), output_dir / "data_grid.png")
    return datamodule


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the configured stages; returns the final metrics (for sweepers)."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
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
    stage = cfg.get("stage", "all")
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {', '.join(STAGES)}.")
    metrics: dict[str, float] = {}
    text_features = cfg.get("text_features")
    if stage in ("inversion", "all"):
        features_path, stage_metrics = run_inversion(cfg, sd_loader, output_dir)
        metrics.update({f"inversion/{k}": v for k, v in stage_metrics.items()})
        text_features = str(features_path)
    if stage in ("finetune", "all"):
        metrics.update(run_finetune(cfg, sd_loader, datamodule, text_features))
    return metrics


STAGES = ("inversion", "finetune", "all", "data")


def _loggers(cfg: DictConfig, suffix: str | None = None) -> list[Logger]:
    """Fresh loggers for one stage; stage 1's get ``suffix`` in their name so runs stay apart."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        kwargs = {}
        if suffix is not None and "name" in node:
            kwargs["name"] = f"{node.name}_{suffix}" if node.name else suffix
        loggers.append(instantiate(node, **kwargs))
    return loggers


def _callbacks(cfg: DictConfig, checkpointing: bool) -> list[L.Callback]:
    callbacks = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        if not checkpointing and key == "model_checkpoint":
            continue
        callbacks.append(instantiate(node))
    return callbacks


def _plugins(cfg: DictConfig) -> dict:
    """Atomic checkpoint writes unless the trainer config brings its own plugins."""
    if cfg.trainer.get("plugins"):
        return {}
    return {"plugins": [AtomicCheckpointIO()]}


def _finish_wandb(loggers: list[Logger]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            logger.experiment.finish()


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
    loggers = _loggers(cfg, suffix="inversion")
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(stage_dir),
        max_steps=cfg.inversion_steps,
        max_epochs=-1,
        callbacks=_callbacks(cfg, checkpointing=False),
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
    _finish_wandb(loggers)
    return stage_dir / "text_features.safetensors", _metrics(trainer)


def run_finetune(
    cfg: DictConfig, sd_loader, datamodule: L.LightningDataModule, text_features: str | None
) -> dict[str, float]:
    """Stage 2: fine-tune the null-text UNet; exports the domain model at the end."""
    # other stage-2 modules (baselines) may take no text features
    extra = {"text_features": text_features} if "text_features" in cfg.module else {}
    module = instantiate(cfg.module, model_loader=sd_loader, **extra)
    loggers = _loggers(cfg)
    trainer = instantiate(
        cfg.trainer,
        callbacks=_callbacks(cfg, checkpointing=True),
        logger=loggers or False,
        **_plugins(cfg),
    )
    log.info("stage 2: null-text UNet fine-tuning from %s", text_features or "the encoded prompt")
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if getattr(module, "export_path", None) is not None:
        log.info("domain model: %s", module.export_path)
    _finish_wandb(loggers)
    return _metrics(trainer)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
