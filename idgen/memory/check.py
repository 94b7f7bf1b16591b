"""The memory plan of an ``idgen-train`` config: printed with ``plan=true``, logged at the start
of every run, and a clear stop when the run cannot fit the device's free memory."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from idgen.memory.plan import CUDA_OVERHEAD, GB, Plan, RunShape, estimate, gpu_fits, lowest
from idgen.memory.settings import MemorySettings, check_run
from idgen.memory.sizes import (
    ModelSizes,
    sizes_from_folder,
    sizes_from_layout,
    sizes_from_pipeline,
)
from idgen.models.family import family_named, family_of
from idgen.models.layouts import TRUE_SIZE, layout_name
from idgen.utils.validation import ConfigError, UserInputError

log = logging.getLogger(__name__)


class MemoryPlanError(UserInputError, MemoryError):
    """The run's planned peak memory exceeds what the device has free."""


def settings_of(cfg: DictConfig) -> MemorySettings:
    """``cfg.memory`` with the module's own values where it sets them (an experiment's
    ``module.gradient_checkpointing=true`` wins over the preset)."""
    node = OmegaConf.to_container(cfg.get("memory") or {}, resolve=True)
    module = cfg.get("module") or {}
    if "gradient_checkpointing" in module:
        node["gradient_checkpointing"] = bool(module.gradient_checkpointing)
    settings = MemorySettings.from_config(node)
    check_run(settings, cfg.get("trainer") or {})
    return settings


def model_sizes(cfg: DictConfig, layout: str | None = None) -> ModelSizes:
    """Parameter shapes of the configured base model, or of the true-size ``layout``
    (``plan=sdxl``, ``plan=sd35_large``: :data:`~idgen.models.layouts.TRUE_SIZE`)."""
    if layout is not None:
        if layout not in TRUE_SIZE:
            raise ConfigError("plan", layout, "is not a model idgen can plan", _plan_fix())
        return sizes_from_layout(layout)
    model = cfg.model
    pretrained = model.get("pretrained")
    family = family_named(str(model.get("family", "sd15")))
    if pretrained and Path(str(pretrained)).is_dir():
        folder = Path(str(pretrained))
        if (folder / family.denoiser_name / "config.json").is_file():
            return sizes_from_folder(folder, _folder_family(folder, family.name))
    if pretrained:  # a hub id (or single file): its published layout, nothing downloaded
        return sizes_from_layout(layout_name(family.name, str(pretrained)))
    from hydra.utils import instantiate

    return sizes_from_pipeline(instantiate(model)())  # a built model (tiny): cheap to build


def _folder_family(folder: Path, configured: str) -> str:
    """The folder's family (its ``model_index.json``), else the configured one."""
    try:
        return family_of(folder).name
    except UserInputError:
        return configured


def _plan_fix() -> str:
    return f"Use plan=true (the configured model) or one of {sorted(TRUE_SIZE)}."


def _validation_on(cfg: DictConfig) -> bool:
    node = (cfg.get("callbacks") or {}).get("decoupled_sampling")
    return bool(node and node.get("every_n_train_steps") and node.get("val_prompts"))


def _optimizer_class(cfg: DictConfig) -> str:
    target = str(((cfg.get("module") or {}).get("optimizer") or {}).get("_target_", "AdamW"))
    return target.rsplit(".", 1)[-1]


def run_shapes(cfg: DictConfig) -> list[RunShape]:
    """One :class:`RunShape` per stage the config runs."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "cpu"))
    if accelerator == "auto":
        import torch

        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    data = cfg.data
    common = dict(
        batch=int(data.batch_size),
        resolution=int(data.resolution),
        precision=str(trainer.get("precision", "32-true")),
        accelerator=accelerator,
        config_optimizer=_optimizer_class(cfg),
        load_dtype=(cfg.get("model") or {}).get("torch_dtype"),
    )
    stage = cfg.get("stage", "all")
    shapes = []
    if stage in ("inversion", "all"):
        shapes.append(RunShape(stage="inversion", validation=False, **common))
    if stage in ("finetune", "all") and "NullText" in str(
        (cfg.get("module") or {}).get("_target_")
    ):
        shapes.append(RunShape(stage="finetune", validation=_validation_on(cfg), **common))
    return shapes


def runtime_bytes() -> float:
    """This process's resident memory now: Python, torch and the libraries already imported."""
    import psutil

    return float(psutil.Process().memory_info().rss)


def plans_for(
    cfg: DictConfig, layout: str | None = None, fits: bool = True
) -> list[tuple[Plan, dict[int, str]]]:
    """The plan of each stage of ``cfg`` (of the true-size ``layout`` when given) and
    (``fits``) which GPU sizes it fits."""
    settings = settings_of(cfg)
    sizes = model_sizes(cfg, layout)
    runtime = runtime_bytes()
    out = []
    for shape in run_shapes(cfg):
        plan = estimate(sizes, settings, shape, runtime)
        out.append((plan, gpu_fits(sizes, settings, shape) if fits else {}))
    return out


def _sharded(cfg: DictConfig) -> bool:
    """Whether the trainer's strategy shards the training state (FSDP, DeepSpeed)."""
    strategy = (cfg.get("trainer") or {}).get("strategy")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return any(k in str(name).lower() for k in ("fsdp", "deepspeed"))


def free_bytes(accelerator: str) -> tuple[float, str]:
    """Free memory of the training device: CUDA's free memory, or the host's available RAM
    plus what this process already holds (the plan counts it)."""
    if accelerator not in ("cpu",):
        import torch

        if torch.cuda.is_available():
            import os

            # this process's GPU (Lightning gives rank r of a node device LOCAL_RANK)
            free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0) or 0))
            return float(free) - CUDA_OVERHEAD, "free GPU memory (less the CUDA context)"
    import psutil

    return float(psutil.virtual_memory().available) + runtime_bytes(), "available RAM"


def plan_or_stop(cfg: DictConfig) -> bool:
    """Log the plan; ``plan=true`` prints it and returns True (nothing else runs); a run whose
    planned peak exceeds the device's free memory stops here with the table (exit 2)."""
    requested = cfg.get("plan", False)
    layout = requested if isinstance(requested, str) and requested != "true" else None
    settings = settings_of(cfg)  # bad memory options: one clear error, before anything else
    # the GPU sizes a run would fit are planned when asked for (plan=true) or when it does
    # not fit here (the suggestion); the run's own plan takes a second
    plans = plans_for(cfg, layout, fits=bool(requested))
    text = "\n".join(plan.table(fits) for plan, fits in plans)
    if requested:
        print(text)
        return True
    log.info("%s", text)
    if not plans:
        return False
    if _sharded(cfg):
        log.info(
            "memory plan: trainer.strategy shards weights/gradients/optimizer state across "
            "devices; the plan above is for one unsharded device and is not enforced"
        )
        return False
    worst = max(plans, key=lambda pf: pf[0].peak)[0]
    free, what = free_bytes(worst.shape.accelerator)
    if worst.peak <= free:
        return False
    text = "\n".join(plan.table(fits) for plan, fits in plans_for(cfg, layout))
    sizes = model_sizes(cfg, layout)
    runtime = runtime_bytes()

    def least_of(**change: Any) -> Plan:  # the lowest plan of the stage that needs the most
        shapes = [replace(plan.shape, **change) for plan, _ in plans]
        return max((lowest(sizes, settings, s, runtime) for s in shapes), key=lambda p: p.peak)

    least = least_of()
    # a CPU run also loads the base in float32 unless model.torch_dtype says otherwise
    half = least_of(load_dtype="bfloat16")
    if least.peak <= free:
        hint = (
            f"try memory=low ({least.peak / GB:.1f} GB planned) or the overrides listed per "
            "GPU size below"
        )
    elif worst.device == "cpu" and half.peak <= free:
        hint = (
            f"memory=low model.torch_dtype=bfloat16 fits ({half.peak / GB:.1f} GB planned: the "
            "base loads in bfloat16 instead of float32)"
        )
    else:
        hint = (
            f"not even idgen's lowest-memory settings fit ({least.peak / GB:.1f} GB planned): "
            "lower data.batch_size or data.resolution, or use a larger device"
        )
    raise MemoryPlanError(
        f"the run needs about {worst.peak / GB:.1f} GB but {what} is {free / GB:.1f} GB; "
        f"{hint}. Plan:\n{text}"
    )


def describe(plans: list[tuple[Plan, dict[int, str]]]) -> list[dict[str, Any]]:
    """The plans as plain data (benchmarks, tests)."""
    return [
        {"stage": p.shape.stage, "peak_gb": p.peak / GB, "phase": p.phase, "fits": fits}
        | {k: v / GB for k, v in p.parts.items()}
        for p, fits in plans
    ]
