"""A real 2x2 w_d x w_c multirun: idgen-eval samples with idgen-sample on the tiny model, then scores.

Checks the contract between idgen-eval's ``sample:`` hook and idgen-sample's command line: the
grid values reach the sampler (they are in each sample's record and are the weights it used),
the images land where evaluation reads them, and the sweep summary covers the grid.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.models import NullTextUNet, build_tiny_sd
from idgen.toyworld.demo import make_demo_domain
from tests.conftest import run_python

GRID_W_D = (0.0, 2.0)
GRID_W_C = (1.0, 3.0)


def export_domain_model(out: Path) -> Path:
    """An untrained null-text UNet (value init) from the tiny SD: enough to exercise w_d."""
    sd = build_tiny_sd(seed=0)
    ids = sd.tokenizer(["a photo of shapes"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        features = sd.text_encoder(ids)[0]
    NullTextUNet.from_unet(sd.unet, features, init="value").save_pretrained(out)
    return out


def run_guidance_sweep(tmp_path: Path, extra: list[str] = ()) -> Path:
    """``idgen-eval hparams_search=guidance_grid`` over GRID_W_D x GRID_W_C; returns the sweep dir."""
    ref = make_demo_domain(tmp_path / "ref", num_images=8, resolution=64, seed=0)
    domain = export_domain_model(tmp_path / "domain_model")
    sweep = tmp_path / "sweep"
    # the documented form (idgen/conf/hparams_search/guidance_grid.yaml): sample.<field>=...
    cmd = [
        "-m", "idgen.evaluate", "hparams_search=guidance_grid",
        f"hydra.sweep.dir={sweep}", f"reference_dir={ref}", "device=cpu",
        f"sample.domain_model={domain}", "sample.images_per_prompt=1", "sample.batch_size=2",
        "sample.steps=2",
        "sample.w_d=" + ",".join(map(str, GRID_W_D)), "sample.w_c=" + ",".join(map(str, GRID_W_C)),
        *extra,
    ]  # fmt: skip
    out = run_python(cmd, tmp_path, root=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return sweep


@pytest.mark.slow  # one idgen-eval process sampling 4 grid points in-process (~15 s of CPU)
def test_real_guidance_grid_through_idgen_sample(tmp_path):
    sweep = run_guidance_sweep(tmp_path, ["~logger"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4

    # 1. each job sampled with its own grid point, into the folder evaluation read
    pixels = {}
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        w_d, w_c = metrics["params"]["w_d"], metrics["params"]["w_c"]
        run = job / "sampling"
        assert metrics["samples_dir"] == str(run / "samples") and metrics["num_samples"] == 2
        records = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 2  # idgen-sample's two default prompts, one image each
        for r in records:
            assert (r["sampler"]["w_d"], r["sampler"]["w_c"]) == (w_d, w_c)
            expected = {"control": w_c} | ({"domain": w_d} if w_d else {})
            assert r["guidance_weights"] == expected  # the weights really used
        pixels[(w_d, w_c)] = np.stack(
            [np.asarray(Image.open(run / r["file"])) for r in records]
        ).astype(int)
    # same seeds, different weights -> different images
    keys = list(pixels)
    assert all(np.abs(pixels[a] - pixels[b]).max() > 0 for a in keys for b in keys if a < b)

    # 2. the summary covers the grid with finite scores; best point named; heatmaps drawn
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    grid = {(float(r["sample.w_d"]), float(r["sample.w_c"])): float(r["fid"]) for r in rows}
    assert set(grid) == {(d, c) for d in GRID_W_D for c in GRID_W_C}
    assert all(math.isfinite(v) for v in grid.values())
    best = min(grid, key=grid.get)
    md = (sweep / "summary.md").read_text()
    assert f"sample.w_d={best[0]}, sample.w_c={best[1]}" in md
    for name in ("heatmap_fid.png", "heatmap_kid_mean.png", "montage.png"):
        with Image.open(sweep / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    print(md)  # shown with -s: the table quoted in the notes
