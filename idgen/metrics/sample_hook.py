"""idgen-eval's ``sample:`` hook: sample with idgen-sample first, then evaluate what it wrote.

The hook's fields are short names for idgen-sample's options, so a sweep is typed as
``sample.domain_model=<folder> sample.model=sd15 sample.pretrained=<sd15>`` rather than a
quoted list of override strings. Anything else goes verbatim into ``sample.overrides``.

Under Hydra's basic launcher every job of a sweep runs in the same process: sampling runs
in-process too (``in_process: true``), so Python, torch and diffusers start once per sweep
rather than once per grid point. ``in_process: false`` runs ``python -m <module>`` instead
(needed when idgen-sample itself launches processes, e.g. ``trainer=ddp``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from idgen.utils.log_media import GROUP_ENV, sweep_group

log = logging.getLogger(__name__)

# hook field -> idgen-sample override key (idgen/conf/sample.yaml); null fields are not forwarded
FIELDS: dict[str, str] = {
    "model": "model",
    "pretrained": "model.pretrained",
    "domain_model": "domain_model",
    "baseline_model": "baseline_model",
    "sampler": "sampler",
    "prompt_file": "prompt_file",
    "images_per_prompt": "images_per_prompt",
    "batch_size": "batch_size",
    "resolution": "resolution",
    "steps": "sampler.num_inference_steps",
    "seed": "seed",
    "trainer": "trainer",
    "dtype": "dtype",
    "w_d": "sampler.w_d",  # the grid axes
    "w_c": "sampler.w_c",
}


def _value(v) -> str:
    """A value as Hydra's override grammar reads it back unchanged (paths with spaces quoted)."""
    text = str(v)
    if any(ch in text for ch in " ,=[]{}()'\"") and not text.startswith(("'", '"')):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def sample_overrides(sample: DictConfig, run_dir: Path | None = None) -> list[str]:
    """idgen-sample's overrides for the hook (names as in idgen/conf/sample.yaml).

    Order: the hook's named fields, then ``sample.overrides`` verbatim, then the image folder
    and, when ``run_dir`` is given, ``hydra.run.dir`` (what evaluation reads must agree).
    """
    overrides = []
    for field, key in FIELDS.items():
        value = sample.get(field)
        if value is not None:
            overrides.append(f"{key}={_value(value)}")
    overrides += [str(o) for o in sample.get("overrides") or ()]
    overrides.append(f"images_subdir={sample.images_subdir}")
    if run_dir is not None:
        overrides.append(f"hydra.run.dir={run_dir}")
    return overrides


def compose_sample_config(overrides: list[str], run_dir: Path) -> DictConfig:
    """idgen-sample's config with the hook's ``overrides``, writing into ``run_dir`` (composed
    inside this Hydra app, or from plain Python)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():  # called from plain Python, not the CLI
        from hydra import initialize_config_dir

        from idgen import CONFIG_DIR

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose_sample_config(overrides, run_dir)
    return compose(config_name="sample", overrides=[*overrides, f"paths.output_dir={run_dir}"])


def _sample_in_process(module: str, overrides: list[str], run_dir: Path) -> None:
    """Compose idgen-sample's config (inside this Hydra app) and call its ``sample(cfg)``."""
    importlib.import_module(module).sample(compose_sample_config(overrides, run_dir))


def sample_first(sample: DictConfig, output_dir: Path) -> Path:
    """Sample into ``output_dir/sampling`` and return its image folder.

    The sampling run dir is fixed, so rerunning the same evaluation (same hydra.run.dir)
    resumes: idgen-sample skips images it already wrote.
    """
    module = sample.get("module") or "idgen.sample"
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"sample-then-evaluate runs idgen-sample (`python -m {module}`), which is not installed: run "
            "idgen-sample yourself and pass samples_dir=<its image folder> (and sample=null)."
        )
    run_dir = output_dir / "sampling"
    group = sweep_group()
    if sample.get("in_process", True):
        overrides = sample_overrides(sample)
        log.info("sampling first (in this process): idgen-sample %s", " ".join(overrides))
        previous = os.environ.get(GROUP_ENV)
        if group:  # a wandb logger of the sampling run joins this sweep's group
            os.environ[GROUP_ENV] = group
        try:
            _sample_in_process(module, overrides, run_dir)
        finally:
            if previous is None:
                os.environ.pop(GROUP_ENV, None)
            else:
                os.environ[GROUP_ENV] = previous
    else:
        command = [sys.executable, "-m", module, *sample_overrides(sample, run_dir)]
        log.info("sampling first: %s", " ".join(command))
        env = dict(os.environ)
        if group:
            env[GROUP_ENV] = group
        subprocess.run(command, check=True, env=env)
    return run_dir / sample.images_subdir
