"""experiments/table1: the toy Table 1 through idgen-train / idgen-sample / idgen-eval."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

from .conftest import compose_config

TABLE1 = REPO / "experiments" / "table1"


def _load(name: str):
    sys.path.insert(0, str(TABLE1))
    try:
        spec = importlib.util.spec_from_file_location(f"table1_{name}", TABLE1 / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(TABLE1))


def test_method_prompt_places_the_caption_in_the_baselines_template():
    recipe = _load("recipe")
    with_token = recipe.Trained(
        "textual_inversion", Path("x"), 32, "a photo of <v> a shape", "a shape"
    )
    without = recipe.Trained("finetune", Path("x"), 1, "a photo of a shape", "a shape")
    base = recipe.Trained("base", None, 0)
    assert recipe.method_prompt("a red circle", with_token) == "a photo of <v> a red circle"
    assert recipe.method_prompt("a red circle", without) == "a photo of a red circle"
    assert recipe.method_prompt(None, with_token) == "a photo of <v> a shape"  # the domain
    assert recipe.method_prompt("a red circle", base) == "a red circle"
    assert recipe.method_prompt(None, base) == ""  # base and ours: the domain is unconditional
    broken = recipe.Trained("oft", Path("x"), 1, "a photo of <v> faces", "a shape")
    with pytest.raises(ValueError, match="does not contain the domain"):
        recipe.method_prompt("a red circle", broken)


def test_every_row_trains_on_the_same_data_batch_and_steps(tmp_path):
    recipe = _load("recipe")
    budgets, methods = set(), set()
    for experiment in recipe.EXPERIMENTS.values():
        if experiment is None:
            continue
        cfg = compose_config("train", tmp_path, [f"experiment={experiment}"])
        budgets.add(
            (cfg.trainer.max_steps, cfg.data.batch_size, cfg.data.num_images, cfg.data.root)
        )
        methods.add(cfg.module.get("method", {}).get("_target_", cfg.module._target_))
        assert cfg.module.optimizer.lr > 0
    assert len(budgets) == 1  # same budget for every method
    assert len(methods) == len(recipe.ROWS) - 1  # and a different method in each row


def test_sampling_settings_per_row(tmp_path):
    recipe = _load("recipe")
    run = _load("run")
    args = run.parse_args(["--out", str(tmp_path)])
    ours = recipe.Trained("ours", tmp_path / "d", 1)
    lora = recipe.Trained("finetune_lora", tmp_path / "b", 1, "a photo of a shape", "a shape")
    spatial = recipe.sampler_overrides(args, ours, spatial=True)
    assert "sampler=controlnet_toyworld" in spatial and f"domain_model={tmp_path / 'd'}" in spatial
    assert f"sampler.w_d={args.w_d}" in spatial
    text = recipe.sampler_overrides(args, lora, spatial=False)
    assert "sampler=cfg" in text and f"baseline_model={tmp_path / 'b'}" in text
    assert "sampler.w_d=0.0" in text and f"sampler.w_c={args.w_c}" in text
    # the same guidance as the README's main job
    from idgen.toyworld import job

    main_job = job.parse_args([])
    assert (args.w_d, args.w_c, args.sample_steps) == (
        main_job.w_d,
        main_job.w_c,
        main_job.sample_steps,
    )
    with pytest.raises(SystemExit):
        run.parse_args(["--conditions", "0"])


@pytest.mark.slow  # seven rows trained (1 step), sampled and evaluated: ~2-4 min on 2 cores
def test_table1_runs_end_to_end_on_a_reduced_budget(tmp_path, capsys):
    from idgen.toyworld.pretrain_controlnet import main as pretrain_controlnet

    run = _load("run")
    out = tmp_path / "table1"
    # a ControlNet trained for 2 steps: the pipeline runs, the numbers mean nothing
    controlnet = tmp_path / "controlnet"
    pretrain_controlnet(
        ["--base", str(REPO / "idgen" / "toyworld" / "base"), "--out", str(controlnet)]
        + ["--steps", "2", "--batch-size", "2", "--eval-num", "0"]
    )
    argv = [
        "--out", str(out), "--steps", "1", "--inversion-steps", "1", "--domain-samples", "2",
        "--images-per-prompt", "1", "--conditions", "2", "--per-condition", "1",
        "--sample-steps", "2", "--controlnet", str(controlnet),
    ]  # fmt: skip
    results = run.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    table = [x for x in lines if x.startswith("| ")]
    assert table[0].split(" | ")[:2] == ["| Method", "#param"]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[1:]}
    assert list(rows) == run.ROWS  # the paper's row order (base first, ours last)
    for name, line in rows.items():
        cells = line.strip(" |").split(" | ")
        assert len(cells) == 8 and "-" not in cells[2:], f"{name}: a metric is missing: {line}"
    # #param is what each module counted: one 32-dim token for textual inversion
    assert rows["textual_inversion"].split(" | ")[1] == "32"
    assert results["rows"]["ours"]["num_params"] > results["rows"]["finetune_lora"]["num_params"]
    # every column is an idgen-eval run dir with its metrics.json (aggregate_table1's layout)
    for name in run.ROWS:
        for column in ("fidelity", "text_align", "spatial_align"):
            metrics = json.loads((out / "table" / name / column / "metrics.json").read_text())
            assert metrics["num_samples"] == {"fidelity": 2, "text_align": 12}.get(column, 2)
    md_lines = (out / "table1.md").read_text().splitlines()
    assert sum(x.startswith("| ") for x in md_lines) == len(run.ROWS) + 1  # header + rows
    with Image.open(out / "table1.png") as figure:
        assert figure.height > len(run.ROWS) * 96  # one 3x-scaled 32px row per method
    # a rerun resumes: nothing retrained, nothing redrawn
    export = out / "ours" / "domain_model" / "config.json"
    stamp = export.stat().st_mtime_ns
    again = run.run(run.parse_args(argv))
    assert export.stat().st_mtime_ns == stamp
    assert again["rows"]["ours"]["metrics"] == results["rows"]["ours"]["metrics"]
