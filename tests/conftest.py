"""Shared fixtures: offline environment, composed configs with tmp output dirs, tiny models."""

from __future__ import annotations

import os
import sys

# Offline before anything imports huggingface_hub or wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process (and per subprocess a test starts), as idgen.utils.threads
# would choose with threads=1: on a shared 2-core machine more threads than free cores made
# runs many times slower. OMP_NUM_THREADS=N make test overrides it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from idgen import CONFIG_DIR  # noqa: E402


def compose_config(
    config_name: str, tmp_path: Path, overrides: list[str] | None = None
) -> DictConfig:
    """Compose a top-level config as the CLI would, with every path under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[f"paths.root_dir={tmp_path}", *(overrides or [])],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.work_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    return cfg


def job_config(config_name: str, tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    """:func:`compose_config` as ``@hydra.main`` hands it to the task: without the hydra node."""
    cfg = compose_config(config_name, tmp_path, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


REPO = Path(__file__).resolve().parents[1]


def run_python(
    args: list[str],
    cwd: Path,
    *,
    root: Path | None = None,
    pythonpath: tuple[Path, ...] = (),
    timeout: int = 600,
    **env: str,
):
    """``python <args>`` in ``cwd`` as a user runs it, offline (no hub, wandb offline), with the
    repository (and ``pythonpath``) importable; ``root`` sets ``IDGEN_ROOT`` (where ``paths.*``
    point), ``env`` adds variables. Returns the ``CompletedProcess``; callers assert on it."""
    import subprocess

    full = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", **env)
    paths = [*map(str, pythonpath), str(REPO), os.environ.get("PYTHONPATH", "")]
    full["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    full.pop("LOCAL_RANK", None)  # a test under a launcher must not look like a DDP rank
    if root is not None:
        full["IDGEN_ROOT"] = str(root)
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def quiet_trainer(root, max_steps: int, **kw):
    """A Lightning ``Trainer`` for tests: one CPU device (unless ``kw`` says otherwise), no
    logger, checkpoints, progress bar or model summary; ``kw`` overrides any of it."""
    import lightning as L

    settings = dict(
        default_root_dir=str(root),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **kw})


def tiny_finetune_module(out_dir, sd=None, lr: float = 1e-3, weight_decay: float = 1e-2, **kw):
    """A ``NullTextFinetuneModule`` over the tiny SD (``sd``, else ``build_tiny_sd(seed=0)``
    loaded in ``setup``), trained with AdamW at ``lr``, writing under ``out_dir``; no export at
    the end of fit unless ``kw`` asks for it."""
    import functools

    import torch

    from idgen.models import build_tiny_sd
    from idgen.modules import NullTextFinetuneModule

    kw.setdefault("export_on_fit_end", False)
    loader = functools.partial(build_tiny_sd, seed=0) if sd is None else (lambda: sd)
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
    return NullTextFinetuneModule(
        model_loader=loader, optimizer=optimizer, output_dir=str(out_dir), **kw
    )


def tiny_controlnet(unet, seed: int = 1):
    """A ControlNet of ``unet`` (diffusers' ``from_unet``) whose output convolutions are random:
    ``from_unet`` zero-initialises them, and a ControlNet that adds nothing tests nothing."""
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        for module in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.1)
    return cn


@pytest.fixture
def tiny_sd():
    from idgen.models import build_tiny_sd

    return build_tiny_sd(seed=0)


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_report_header(config):
    from idgen.utils.threads import usable_cpus

    return f"idgen: {os.environ['OMP_NUM_THREADS']} torch thread(s), {usable_cpus()} usable CPU(s)"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu``-marked tests without CUDA (``IDGEN_GPU_TEST_DEVICE=cpu`` dry-runs them)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("IDGEN_GPU_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU: benchmarks/device_check.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A stand-in for idgen-sample in idgen-eval sweep tests: accepts the same overrides
# (sampler.w_d, sampler.w_c, hydra.run.dir) and brightens the reference images with the weights,
# so FID over a grid has a known best point (the smallest weights).
STAND_IN_SAMPLER = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image
args = dict(a.split("=", 1) for a in sys.argv[1:])
w_d, w_c = float(args["sampler.w_d"]), float(args["sampler.w_c"])
out = Path(args["hydra.run.dir"]) / "samples"
out.mkdir(parents=True, exist_ok=True)
ref = sorted(Path(args["ref"]).glob("*.png"))
for i, p in enumerate(ref):
    img = np.asarray(Image.open(p).convert("RGB")).astype(int) + int(30 * w_d + 10 * w_c)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / f"{i:05d}.png")
"""


@pytest.fixture
def stand_in_sweep(tmp_path):
    """What the idgen-eval sweep tests share: ``run(search, sweep_dir, *overrides, num_images=)``
    writes a folder of demo reference images and ``stand_in_sampler.py`` under ``tmp_path``,
    runs ``idgen-eval hparams_search=<search>`` offline with the stand-in sampler (fast, no
    model) into ``sweep_dir``, asserts it succeeded and returns the reference folder."""
    from idgen.toyworld.demo import make_demo_domain

    def run(search: str, sweep_dir: Path, *overrides: str, num_images: int = 6) -> Path:
        ref = make_demo_domain(tmp_path / "ref", num_images=num_images, resolution=64, seed=0)
        (tmp_path / "stand_in_sampler.py").write_text(STAND_IN_SAMPLER)
        cmd = [
            "-m", "idgen.evaluate", f"hparams_search={search}",
            f"hydra.sweep.dir={sweep_dir}", f"reference_dir={ref}", "device=cpu",
            "sample.module=stand_in_sampler", "sample.in_process=false",
            f"sample.overrides=['ref={ref}']", *overrides,
        ]  # fmt: skip
        out = run_python(cmd, tmp_path, root=tmp_path, pythonpath=(tmp_path,))
        assert out.returncode == 0, out.stderr[-3000:]
        return ref

    return run
