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
from tests.test_train_stages import FAST, compose_config
from tests.test_wandb_dashboards import read_run, wandb_records


def run_record(run_dir) -> dict:
    """run id, group, name, config (top-level keys -> values) and history of an offline run."""
    read_run(run_dir)  # waits until wandb's service has written the whole run
    (path,) = run_dir.glob("run-*.wandb")
    out: dict = {"config": {}, "steps": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, group=record.run.run_group)
            out["name"] = record.run.display_name
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            row = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            out["steps"].append(row)
    return out


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
    cfg = compose_config("train", tmp_path, overrides)
    train(cfg)
    run_dir = tmp_path / "run"
    runs = [run_record(d) for d in sorted(run_dir.rglob("offline-run-*")) if d.is_dir()]
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
        grids = {k.split("/")[1] for row in r["steps"] for k in row if k.startswith("grids/")}
        assert {"data_grid", "base_grid"} <= grids
        # the caption travels with the image (wandb stores it in the image's record)
        logged = [json.dumps(v) for row in r["steps"] for k, v in row.items() if "data_grid" in k]
        assert any("first training batch" in text for text in logged)


@pytest.mark.slow
def test_resumed_stage_continues_the_same_wandb_run(tmp_path):
    features = tmp_path / "tf.safetensors"
    save_text_features(features, torch.randn(1, 77, 32), {"prompt": "given"})
    overrides = [*FAST, "stage=finetune", f"text_features={features}", "logger=wandb"]
    train(compose_config("train", tmp_path, overrides))
    train(compose_config("train", tmp_path, [*overrides, "trainer.max_steps=4", "ckpt_path=last"]))
    run_dir = tmp_path / "run"
    runs = [run_record(d) for d in sorted(run_dir.rglob("offline-run-*")) if d.is_dir()]
    assert len(runs) == 2
    assert runs[0]["id"] == runs[1]["id"]  # the same wandb run, continued
    ids = json.loads((run_dir / "wandb_run_ids.json").read_text())
    assert runs[0]["id"] == ids["finetune"]

    def global_steps(run):
        return [row["trainer/global_step"] for row in run["steps"] if "trainer/global_step" in row]

    first, second = sorted((global_steps(r) for r in runs), key=lambda s: min(s or [0]))
    assert first and second and min(second) >= 2 > min(first)  # the resumed run goes on from 2
