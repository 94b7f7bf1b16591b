"""experiments/aggregate_table1.py and the paper recipe files."""

from __future__ import annotations

import importlib.util
import json

from omegaconf import OmegaConf

from tests.conftest import REPO


def _load_aggregate():
    spec = importlib.util.spec_from_file_location(
        "aggregate_table1", REPO / "experiments" / "aggregate_table1.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table1_from_run_dirs(tmp_path, capsys):
    runs = {
        ("ours", "face_fid"): {"fid": 6.571, "num_samples": 50000},
        ("ours", "text_align"): {"attribute_alignment": 0.891, "attribute_num_samples": 1000},
        ("finetune", "spatial_align"): {"canny_discrepancy": 0.2249, "canny_num_samples": 200},
    }
    for (method, column), metrics in runs.items():
        (tmp_path / method / column).mkdir(parents=True)
        (tmp_path / method / column / "metrics.json").write_text(json.dumps(metrics))
    _load_aggregate().main([str(tmp_path), "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| Method | Face FID↓ | Animal FID↓ | Porcelain FID↓ | Text Align.↑")
    # paper row order: fine-tuning before ours
    assert lines[2] == "| finetune | - | - | - | - | 0.22 (n=200) |"
    assert lines[3] == "| ours | 6.57 (n=50000) | - | - | 0.89 (n=1000) | - |"


def test_attribute_prompt_file_matches_metric_suite():
    prompts = (REPO / "experiments" / "face_attribute_prompts.txt").read_text().splitlines()
    suite = OmegaConf.load(REPO / "idgen" / "conf" / "metrics" / "face_attributes.yaml")
    assert prompts == [a.prompt for a in suite.attributes]
    assert len(prompts) == 10
