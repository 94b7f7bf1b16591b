"""idgen-eval: evaluate a folder of samples (optionally sampling it first) against a reference folder.

Examples:
    idgen-eval samples_dir=outputs/sample/runs/<run>/samples reference_dir=data/demo
    idgen-eval metrics=inception metrics.fid.extractor.weights_path=/models/inception.pth ...
    idgen-eval -m hparams_search=guidance_grid ...        # w_d x w_c grid + summary
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from idgen import cli
from idgen.metrics.clip import Attribute
from idgen.metrics.evaluation import evaluate_folder
from idgen.metrics.results import write_metrics
from idgen.metrics.sample_hook import sample_first, sample_overrides  # noqa: F401 (re-export)
from idgen.preflight import validate_eval
from idgen.utils.io import atomic_write_text
from idgen.utils.log_media import finish_loggers, instantiate_loggers

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def write_job_config(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """Create ``output_dir`` and write the resolved job config to its config.yaml (atomic).

    Returns that job config: ``cfg`` without Hydra's own node, which is not ours.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(job_cfg, resolve=True))
    return job_cfg


def samples_folder(cfg: DictConfig, output_dir: Path) -> Path:
    """The folder to evaluate: ``cfg.samples_dir``, or sampled now into ``output_dir`` when
    ``cfg.sample`` is set; clear error if neither is."""
    if cfg.sample is not None:
        return sample_first(cfg.sample, output_dir)
    if cfg.samples_dir is None:
        raise ValueError(
            "set samples_dir=<folder of generated images> (or configure `sample` to sample first)."
        )
    return Path(cfg.samples_dir)


def fid_setup(fid: DictConfig | None) -> tuple[nn.Module | None, dict | None]:
    """The FID/KID feature extractor (instantiated: its weights are read) and the KID options,
    or ``(None, None)`` when FID is off."""
    if fid is None:
        return None, None
    extractor = instantiate(fid.extractor)
    return extractor, {k: fid[k] for k in ("kid", "kid_subsets", "kid_subset_size")}


def compute_metrics(cfg: DictConfig, samples_dir: Path) -> dict:
    """:func:`evaluate_folder` of ``samples_dir`` with the metrics ``cfg.metrics`` configures."""
    m = cfg.metrics
    extractor, fid_options = fid_setup(m.fid)
    attributes = [Attribute(**a) for a in m.attributes] if m.attributes else None
    canny = OmegaConf.to_container(m.canny, resolve=True) if m.canny is not None else None
    return evaluate_folder(
        samples_dir,
        reference_dir=cfg.reference_dir,
        extractor=extractor,
        fid_options=fid_options,
        clip_model=m.clip.model if m.clip is not None else None,
        attributes=attributes,
        canny_options=canny,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        device=resolve_device(cfg.device),
        cache_dir=Path(cfg.paths.cache_dir) / "reference_features",
        scan_cache_dir=Path(cfg.paths.cache_dir) / "scans",  # training's scan of the same folder
        seed=cfg.seed,
        extra_metrics=[instantiate(node) for node in (m.get("extra") or {}).values()],
    )


def sample_params(sample: DictConfig) -> dict:
    """The guidance weights the samples were drawn with (a sweep's axes), for metrics.json."""
    return {k: sample.get(k) for k in ("w_d", "w_c")}


def eval_scalars(results: dict) -> dict[str, float]:
    """The numeric results as ``eval/<name>`` floats for the loggers (flags are not metrics)."""
    return {
        f"eval/{k}": float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def log_to_loggers(logger_cfg: DictConfig | None, job_cfg: DictConfig, scalars: dict) -> None:
    """Log the job config and ``scalars`` (step 0) to each configured logger, then finish them."""
    loggers = instantiate_loggers(logger_cfg)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(job_cfg, resolve=True))
        logger.log_metrics(scalars, step=0)
    finish_loggers(loggers)  # one wandb run per sweep job, grouped by the sweep dir


def log_headline(results: dict, metrics_path: Path) -> None:
    """One log line: the sample count, the headline metrics present, and where they are."""
    summary = ", ".join(
        f"{k}={results[k]:.4g}"
        for k in ("fid", "kid_mean", "clip_score", "attribute_alignment", "canny_discrepancy")
        if k in results
    )
    log.info("metrics (n=%d samples): %s -> %s", results["num_samples"], summary, metrics_path)


def evaluate(cfg: DictConfig) -> dict:
    """Compute the configured metrics, write metrics.json in the run dir, log them; return them."""
    validate_eval(cfg)  # folders, numbers, device: before any image or extractor is read
    output_dir = Path(cfg.paths.output_dir)
    job_cfg = write_job_config(cfg, output_dir)

    # 1. the samples: a given folder, or sampled now
    samples_dir = samples_folder(cfg, output_dir)

    # 2. the metrics
    results = compute_metrics(cfg, samples_dir)
    if cfg.sample is not None:
        results["params"] = sample_params(cfg.sample)

    # 3. record: metrics.json (atomic) and the loggers
    metrics_path = write_metrics(output_dir, results)
    log_to_loggers(cfg.get("logger"), job_cfg, eval_scalars(results))
    log_headline(results, metrics_path)
    return results


# The console script (idgen.cli: nothing heavy is imported before the task and its checks run)
main = cli.evaluate


if __name__ == "__main__":
    main()
