"""idgen-eval: evaluate a folder of samples (optionally sampling it first) against a reference folder.

Examples:
    idgen-eval samples_dir=outputs/sample/runs/<run>/samples reference_dir=data/demo
    idgen-eval metrics=inception metrics.fid.extractor.weights_path=/models/inception.pth ...
    idgen-eval -m hparams_search=guidance_grid ...        # w_d x w_c grid + summary
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from idgen import CONFIG_DIR
from idgen.callbacks.log_media import GROUP_ENV, finish_loggers, instantiate_loggers, sweep_group
from idgen.metrics.clip import Attribute
from idgen.metrics.evaluation import evaluate_folder
from idgen.metrics.results import write_metrics
from idgen.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sample_overrides(sample: DictConfig, run_dir: Path) -> list[str]:
    """idgen-sample's command line for the ``sample:`` hook (names as in conf/sample.yaml).

    The user's overrides come first; the grid axes (``sampler.w_d``/``sampler.w_c``), the image
    subfolder and the run dir are set last so they always agree with what evaluation reads.
    """
    overrides = [str(o) for o in sample.overrides]
    for key in ("w_d", "w_c"):  # the grid axes, forwarded to the sampler config
        if sample.get(key) is not None:
            overrides.append(f"sampler.{key}={sample[key]}")
    overrides.append(f"images_subdir={sample.images_subdir}")
    overrides.append(f"hydra.run.dir={run_dir}")
    return overrides


def sample_first(cfg: DictConfig, output_dir: Path) -> Path:
    """Run idgen-sample into ``output_dir/sampling`` and return its image folder.

    The sampling run dir is fixed, so rerunning the same evaluation (same hydra.run.dir)
    resumes: idgen-sample skips images it already wrote.
    """
    module = cfg.sample.get("module", "idgen.sample")
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"sample-then-evaluate runs `python -m {module}`, which is not installed: run "
            "idgen-sample yourself and pass samples_dir=<its image folder> (and sample=null)."
        )
    run_dir = output_dir / "sampling"
    command = [sys.executable, "-m", module, *sample_overrides(cfg.sample, run_dir)]
    log.info("sampling first: %s", " ".join(command))
    env = dict(os.environ)
    group = sweep_group()
    if group:  # a wandb logger of the sampling run joins this sweep's group
        env[GROUP_ENV] = group
    subprocess.run(command, check=True, env=env)
    return run_dir / cfg.sample.images_subdir


def evaluate(cfg: DictConfig) -> dict:
    """Compute the configured metrics, write metrics.json in the run dir, log them; return them."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(
        cfg, [k for k in cfg if k != "hydra"]
    )  # hydra's own node is not ours
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(job_cfg, resolve=True))

    # 1. the samples: a given folder, or sampled now
    if cfg.sample is not None:
        samples_dir = sample_first(cfg, output_dir)
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
def main(cfg: DictConfig) -> float | None:
    results = evaluate(cfg)
    metric = cfg.get("optimized_metric")
    return float(results[metric]) if metric and metric in results else None


if __name__ == "__main__":
    main()
