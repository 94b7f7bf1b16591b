"""benchmarks/bench_guidance_cost.py runs, and its options are what they claim to be."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_guidance_cost import main, options  # noqa: E402

from idgen.models import NullTextUNet, load_sd  # noqa: E402
from idgen.toyworld import BASE_DIR  # noqa: E402


def test_options_cut_only_the_domain_term():
    opts = options(2.0, 2.5)
    assert [t.name for t in opts["cfg (w_d = 0)"]] == ["control"]  # CFG: no domain pass
    for name, terms in opts.items():
        control = next(t for t in terms if t.name == "control")
        assert (control.weight, control.start, control.end, control.reuse_every) == (2.5, 0, 1, 1)
        if name != "cfg (w_d = 0)":
            assert next(t for t in terms if t.name == "domain").weight == 2.0
    assert next(t for t in opts["domain reuse k=3"] if t.name == "domain").reuse_every == 3
    assert next(t for t in opts["domain in first 50%"] if t.name == "domain").end == 0.5


def test_benchmark_runs_on_the_toy_base_and_reports_ratios(tmp_path):
    sd = load_sd(BASE_DIR)
    ids = sd.tokenizer(["a photo of a shape"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        features = sd.text_encoder(ids)[0]
    NullTextUNet.from_unet(sd.unet, features, init="value").save_pretrained(tmp_path / "domain")
    out = tmp_path / "cost.json"
    result = main(
        ["--domain-model", str(tmp_path / "domain"), "--per-caption", "1", "--steps", "3"]
        + ["--repeats", "1", "--out", str(out)]
    )
    rows = result["rows"]
    assert set(rows) == set(options(2.0, 2.5)) and rows["cfg (w_d = 0)"]["ratio_vs_cfg"] == 1.0
    for r in rows.values():
        assert r["n"] == 12 and 0 <= r["colour"] <= 1 and r["s_per_image"] > 0
    assert json.loads(out.read_text())["rows"].keys() == rows.keys()
