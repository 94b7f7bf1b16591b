"""The main-job command runs end to end on the tiny preset (in a tmp dir)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import run_python


def run_cli(module: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_python(
        ["-m", module, f"hydra.run.dir={tmp_path / 'run'}", *overrides], tmp_path, root=tmp_path
    )


def test_train_cli_writes_data_and_base_grid(tmp_path):
    result = run_cli(
        "idgen.train", tmp_path, "stage=data", "data.num_images=16", "preview.num_inference_steps=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert len(list((tmp_path / "data" / "demo_shapes").glob("*.png"))) == 16
    manifest = (run / "data_manifest.txt").read_text().splitlines()
    assert sum(line.startswith("train\t") for line in manifest) == 16
    grid = np.asarray(Image.open(run / "base_grid.png"))
    # 4 prompts in a row (64px images enlarged to 256px so a person can see them, 2px gaps),
    # captioned above and labelled with their prompts below
    assert grid.shape[0] > 256 + 4 and grid.shape[1] == 4 * 256 + 5 * 2
    assert (run / "config.yaml").is_file() and (run / "data_grid.png").is_file()
    assert "data: 16 training images" in result.stderr + result.stdout
