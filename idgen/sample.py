"""idgen-sample: ``trainer.predict`` with the DecoupledGuidanceSampling callback (N devices split the work).

    idgen-sample domain_model=<exported domain model> sampler=decoupled prompts='[a photo of a face]'
    idgen-sample trainer=ddp trainer.devices=8 prompt_file=prompts.txt images_per_prompt=100
    idgen-sample sampler=cfg baseline_model=<exported baseline> "prompts=['a photo of <v> face']"

Images, ``samples.jsonl`` and per-prompt grids go to the run dir; rerunning with the same
``hydra.run.dir`` resumes (finished images are skipped).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from idgen import cli
from idgen.preflight import validate_sample
from idgen.sampling import (
    DecoupledGuidanceSampling,
    DomainModel,
    PromptsDataModule,
    SamplerSettings,
    read_prompts,
)
from idgen.utils.io import atomic_write_text
from idgen.utils.log_media import finish_loggers, instantiate_loggers

log = logging.getLogger(__name__)


def model_ids(cfg: DictConfig, settings: SamplerSettings) -> dict[str, Any]:
    """Which weights made the images (recorded in every PNG and in samples.jsonl)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    target = str(model.pop("_target_", ""))
    model.pop("_partial_", None)
    sd = model.get("pretrained") or f"{target.rsplit('.', 1)[-1]}({model})"
    ids = {
        "sd": str(sd),
        "domain": cfg.domain_model,
        "controlnet": settings.controlnet,
        "extra": [g.get("model") for g in settings.extra_guidance],
    }
    if cfg.get("baseline_model"):  # only when set: earlier runs keep their parameter hash
        ids["baseline"] = str(cfg.baseline_model)
        ids["baseline_mode"] = settings.baseline_mode
    return ids


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Sample every (prompt, image) not yet on disk; returns a summary (for callers and tests)."""
    validate_sample(cfg)  # names, finite weights, prompts, model folders: before any model loads
    output_dir = Path(cfg.paths.output_dir)
    settings: SamplerSettings = instantiate(cfg.sampler)
    prompts = read_prompts(cfg.prompts, cfg.prompt_file)

    # 1. The plan (prompts x seeds), the module holding the domain model, and the callback
    #    holding the frozen SD and the guidance: trainer.predict(module, datamodule, callbacks).
    data = PromptsDataModule(prompts, cfg.images_per_prompt, cfg.seed, cfg.batch_size)
    module = DomainModel(cfg.domain_model)
    sampling = DecoupledGuidanceSampling(
        sd=instantiate(cfg.model),
        settings=settings,
        out_dir=output_dir,
        batch_size=cfg.batch_size,
        resolution=cfg.resolution,
        dtype=cfg.dtype,
        cpu_offload=cfg.cpu_offload,
        baseline_model=cfg.get("baseline_model"),
        model_ids=model_ids(cfg, settings),
        images_subdir=cfg.images_subdir,
        grids=cfg.grids,
    )

    # 2. Predict: Lightning shards the indices over devices; the callback samples and writes.
    # Loggers (optional) get the grids with captions and the per-step guidance trace.
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[sampling], logger=loggers or False, enable_checkpointing=False
    )
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        # The hydra node is present only when composed with return_hydra_config (tests).
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        atomic_write_text(output_dir / "sample_config.yaml", OmegaConf.to_yaml(plain, resolve=True))
    trainer.predict(module, datamodule=data, return_predictions=False)
    if rank_zero_only.rank == 0:
        finish_loggers(loggers)
    writer = sampling.writer
    done = sum(writer.is_done(i) for i in range(len(data.plan)))
    log.info("sample: %d/%d images in %s", done, len(data.plan), writer.images_dir)
    return {"num_images": done, "total": len(data.plan), "images_dir": str(writer.images_dir)}


# The console script (idgen.cli: nothing heavy is imported before the task and its checks run)
main = cli.sample


if __name__ == "__main__":
    main()
