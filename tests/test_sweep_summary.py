"""Sweep summary from job folders shaped like a Hydra multirun of idgen-eval."""

from __future__ import annotations

import csv
import json

import numpy as np
import yaml
from PIL import Image

from idgen.metrics.heatmap import colormap
from idgen.metrics.sweep_summary import main, summarize


def _fake_sweep(root, grid):
    """One job folder per (w_d, w_c): metrics.json + .hydra/overrides.yaml as Hydra writes them."""
    for i, (w_d, w_c, fid, clip) in enumerate(grid):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"sampler.w_d={w_d}", f"sampler.w_c={w_c}", "seed=0"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        metrics = {"fid": fid, "clip_score": clip, "num_samples": 8, "feature_extractor": "tiny"}
        (job / "metrics.json").write_text(json.dumps(metrics))
    (root / "9").mkdir()  # an unfinished job: no metrics.json, skipped
    return root


GRID = [(0.0, 1.0, 5.0, 20.0), (0.0, 3.0, 4.0, 25.0), (2.0, 1.0, 2.0, 21.0), (2.0, 3.0, 3.0, 22.0)]


def test_summary_files_and_best_points(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", GRID)
    written = summarize(sweep)
    assert {"csv", "markdown", "heatmap_fid", "heatmap_clip_score"} <= set(written)

    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert "seed" not in rows[0]  # constant overrides are not axes
    assert [(float(r["sampler.w_d"]), float(r["sampler.w_c"]), float(r["fid"])) for r in rows] == [
        (w_d, w_c, fid) for w_d, w_c, fid, _ in GRID
    ]

    md = (sweep / "summary.md").read_text()
    assert "best fid: **2** at sampler.w_d=2.0, sampler.w_c=1.0 (job 2, n=8)" in md
    assert "best clip_score: **25** at sampler.w_d=0.0, sampler.w_c=3.0 (job 1, n=8)" in md
    assert "| job | sampler.w_d | sampler.w_c |" in md


def _cell_colour(png, row, col, cell=64, left=90, top=40):
    img = np.asarray(Image.open(png).convert("RGB"))
    return tuple(img[top + row * cell + cell - 8, left + col * cell + cell - 8])


def _frame_pixel(png, row, col, cell=64, left=90, top=40):
    img = np.asarray(Image.open(png).convert("RGB"))
    return tuple(img[top + row * cell + cell // 2, left + col * cell + 1])


def test_heatmap_colours_and_best_frame(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", GRID)
    summarize(sweep)
    png = sweep / "heatmap_fid.png"
    # rows are w_d (0, 2), columns w_c (1, 3); fid lowest (2.0) at w_d=2, w_c=1 -> row 1, col 0
    assert _cell_colour(png, 1, 0) == colormap(0.0)
    assert _cell_colour(png, 0, 0) == colormap(1.0)  # 5.0 is the highest fid
    assert _frame_pixel(png, 1, 0) == (255, 0, 0)
    assert _frame_pixel(png, 0, 0) != (255, 0, 0)
    # clip: higher is better -> best at w_d=0, w_c=3 -> row 0, col 1
    assert _frame_pixel(sweep / "heatmap_clip_score.png", 0, 1) == (255, 0, 0)


def test_cli_prints_table(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep", GRID)
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "best fid" in out and "summary.csv" in out
