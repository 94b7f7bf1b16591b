"""experiments/table1: the one-command Table 1 recipe on the tiny demo."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from idgen.metrics import Attribute

REPO = Path(__file__).resolve().parents[1]
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


def test_method_prompt_inserts_the_learned_token_only():
    recipe = _load("recipe")
    with_token = recipe.Trained("textual_inversion", Path("x"), 1, "a photo of <v> faces", "<v>")
    without = recipe.Trained("finetune", Path("x"), 1, "a photo of faces")
    prompt = "a photo of faces, smiling"
    assert recipe.method_prompt(prompt, with_token, "faces") == "a photo of <v> faces, smiling"
    assert recipe.method_prompt(prompt, without, "faces") == prompt
    attrs = recipe.default_attributes("shapes")
    assert all(isinstance(a, Attribute) and "shapes" in a.prompt for a in attrs)
    assert len({a.prompt for a in attrs}) == len(attrs)


def test_bad_domain_folder_is_refused(tmp_path):
    run = _load("run")
    with pytest.raises(SystemExit, match="not a folder"):
        run.main(
            [
                "--domain",
                str(tmp_path / "nope"),
                "--sd",
                "tiny",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "out"),
            ]
        )


@pytest.mark.slow  # six methods trained, sampled and evaluated: minutes on 2 CPU cores
def test_table1_runs_end_to_end_on_the_tiny_demo(tmp_path, capsys):
    run = _load("run")
    out = tmp_path / "table1"
    run.main(
        [
            "--domain",
            "demo",
            "--sd",
            "tiny",
            "--steps",
            "1",
            "--inversion-steps",
            "1",
            "--batch-size",
            "2",
            "--num-samples",
            "2",
            "--samples-per-attribute",
            "1",
            "--num-canny",
            "1",
            "--sample-steps",
            "2",
            "--clip",
            "tiny",
            "--controlnet",
            "tiny",
            "--fid-column",
            "face_fid",
            "--out",
            str(out),
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("Method"))) :]
    assert table[0].split()[:2] == ["Method", "#param"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert list(rows) == run.ROWS  # the paper's row order, ours last
    for name, line in rows.items():
        assert line.count("(n=") == 3, f"{name}: a metric column is missing: {line}"
    # the #param column is what each module counted, e.g. 2 x 32 token dims for TI (1 vector)
    assert rows["textual_inversion"].split()[1] == "32"
    # metrics.json in experiments/aggregate_table1.py's layout, read back by it
    for name in run.ROWS:
        for column in ("face_fid", "text_align", "spatial_align"):
            assert json.loads((out / "table" / name / column / "metrics.json").read_text())
    aggregate = _load_aggregate()
    summary = aggregate.render(aggregate.table(out / "table"), markdown=True)
    assert summary.count("\n") == len(run.ROWS) + 1


def _load_aggregate():
    spec = importlib.util.spec_from_file_location(
        "aggregate_table1", REPO / "experiments" / "aggregate_table1.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
