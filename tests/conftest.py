"""Shared fixtures: offline environment, composed configs with tmp output dirs, tiny models."""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub or wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture
def tiny_sd():
    from idgen.models import build_tiny_sd

    return build_tiny_sd(seed=0)


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu``-marked tests without CUDA (``IDGEN_GPU_TEST_DEVICE=cpu`` dry-runs them)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("IDGEN_GPU_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU: benchmarks/device_check.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
