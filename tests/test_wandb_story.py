"""wandb tells the whole story of a training run (offline run files read back).

The stages of one idgen-train run share a group and have names; every run carries the full
resolved config (lr, batch size, data root, resolution, steps, precision, model); the data and
base-model grids are logged with captions; a resumed stage 2 continues the same wandb run
(id kept in the run dir) at the step it resumed from.
"""

from __future__ import annotations

import json

import pytest
import torch

from idgen.modules.sd_parts import save_text_features
from idgen.train import train
from tests.conftest import job_config
from tests.test_train_stages import FAST
from tests.test_wandb_dashboards import read_run


def _value(config: dict, key: str):
    """wandb stores each top-level key as {"value": ...}."""
    value = config[key]
    return value["value"] if isinstance(value, dict) and "value" in value else value


@pytest.mark.slow  # two stages + previews on the tiny model (~30-60 s on 2 busy cores)
def test_training_stages_grouped_named_full_config_and_grids(tmp_path):
    overrides = [
        *FAST,
        "logger=wandb",
        "preview.enabled=true",
        "preview.num_inference_steps=2",
        "preview.prompts=[a photo of a red circle]",
    ]
    cfg = job_config("train", tmp_path, overrides)
    train(cfg)
    run_dir = tmp_path / "run"
    runs = [read_run(d) for d in sorted(run_dir.rglob("offline-run-*")) if d.is_dir()]
    assert len(runs) == 2
    assert {r["name"] for r in runs} == {cfg.task_name, f"{cfg.task_name}_inversion"}
    assert {r["group"] for r in runs} == {run_dir.name}  # one group: this run dir
    for r in runs:
        config = r["config"]
        assert {"trainer", "data", "model", "module", "paths", "seed"} <= set(config)
        data, trainer = _value(config, "data"), _value(config, "trainer")
        assert data["root"] == cfg.data.root and data["batch_size"] == 4
        assert data["resolution"] == cfg.data.resolution
        assert trainer["max_steps"] == 2 and "precision" in trainer
        assert _value(config, "module")["optimizer"]["lr"] == cfg.module.optimizer.lr
        grids = {k.split("/")[1] for row in r["history"] for k in row if k.startswith("grids/")}
        assert {"data_grid", "base_grid"} <= grids
        # the caption travels with the image (wandb stores it in the image's record)
        logged = [json.dumps(v) for row in r["history"] for k, v in row.items() if "data_grid" in k]
        assert any("first training batch" in text for text in logged)


@pytest.mark.slow
def test_resumed_stage_continues_the_same_wandb_run(tmp_path):
    features = tmp_path / "tf.safetensors"
    save_text_features(features, torch.randn(1, 77, 32), {"prompt": "given"})
    overrides = [*FAST, "stage=finetune", f"text_features={features}", "logger=wandb"]
    train(job_config("train", tmp_path, overrides))
    train(job_config("train", tmp_path, [*overrides, "trainer.max_steps=4", "ckpt_path=last"]))
    run_dir = tmp_path / "run"
    runs = [read_run(d) for d in sorted(run_dir.rglob("offline-run-*")) if d.is_dir()]
    assert len(runs) == 2
    assert runs[0]["id"] == runs[1]["id"]  # the same wandb run, continued
    ids = json.loads((run_dir / "wandb_run_ids.json").read_text())
    assert runs[0]["id"] == ids["finetune"]

    def global_steps(run):
        return [
            row["trainer/global_step"] for row in run["history"] if "trainer/global_step" in row
        ]

    first, second = sorted((global_steps(r) for r in runs), key=lambda s: min(s or [0]))
    assert first and second and min(second) >= 2 > min(first)  # the resumed run goes on from 2
