"""idgen-eval: evaluate a folder of samples (optionally sampling it first) against a reference folder.

Examples:
    idgen-eval samples_dir=outputs/sample/runs/<run>/samples reference_dir=data/demo
    idgen-eval metrics=inception metrics.fid.extractor.weights_path=/models/inception.pth ...
    idgen-eval -m hparams_search=guidance_grid ...        # w_d x w_c grid + summary
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from idgen import CONFIG_DIR
from idgen.callbacks.log_media import finish_loggers, instantiate_loggers
from idgen.metrics.clip import Attribute
from idgen.metrics.evaluation import evaluate_folder
from idgen.metrics.results import write_metrics
from idgen.metrics.sample_hook import sample_first, sample_overrides  # noqa: F401 (re-export)
from idgen.utils.io import atomic_write_text
from idgen.utils.task import console_main, task_wrapper
from idgen.utils.validation import validate_eval

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate(cfg: DictConfig) -> dict:
    """Compute the configured metrics, write metrics.json in the run dir, log them; return them."""
    validate_eval(cfg)  # folders, numbers, device: before any image or extractor is read
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(
        cfg, [k for k in cfg if k != "hydra"]
    )  # hydra's own node is not ours
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(job_cfg, resolve=True))

    # 1. the samples: a given folder, or sampled now
    if cfg.sample is not None:
        samples_dir = sample_first(cfg.sample, output_dir)
    elif cfg.samples_dir is None:
        raise ValueError(
            "set samples_dir=<folder of generated images> (or configure `sample` to sample first)."
        )
    else:
        samples_dir = Path(cfg.samples_dir)

    # 2. the metrics
    m = cfg.metrics
    fid_options = None
    extractor = None
    if m.fid is not None:
        extractor = instantiate(m.fid.extractor)
        fid_options = {k: m.fid[k] for k in ("kid", "kid_subsets", "kid_subset_size")}
    attributes = [Attribute(**a) for a in m.attributes] if m.attributes else None
    canny = OmegaConf.to_container(m.canny, resolve=True) if m.canny is not None else None
    results = evaluate_folder(
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
    if cfg.sample is not None:
        results["params"] = {k: cfg.sample.get(k) for k in ("w_d", "w_c")}

    # 3. record: metrics.json (atomic) and the loggers
    write_metrics(output_dir, results)
    scalars = {
        f"eval/{k}": float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(job_cfg, resolve=True))
        logger.log_metrics(scalars, step=0)
    finish_loggers(loggers)  # one wandb run per sweep job, grouped by the sweep dir
    summary = ", ".join(
        f"{k}={results[k]:.4g}"
        for k in ("fid", "kid_mean", "clip_score", "attribute_alignment", "canny_discrepancy")
        if k in results
    )
    log.info(
        "metrics (n=%d samples): %s -> %s",
        results["num_samples"],
        summary,
        output_dir / "metrics.json",
    )
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
@task_wrapper
def hydra_main(cfg: DictConfig) -> dict:
    """``idgen-eval``: ``logger=null`` (any ``group=null``) is accepted as "no group"."""
    return evaluate(cfg)


main = console_main(hydra_main, CONFIG_DIR)


if __name__ == "__main__":
    main()
