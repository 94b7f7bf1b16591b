"""Sweep summary from job folders shaped like a Hydra multirun of idgen-eval."""

from __future__ import annotations

import csv
import json

import numpy as np
import yaml
from PIL import Image

from idgen.metrics.heatmap import decimals_for, draw_montage, heatmap_figure
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


def test_heatmap_labels_colour_bar_and_best_frame():
    grid = [[5.0, 4.0], [2.0, 3.25]]  # rows w_d (0, 2), columns w_c (1, 3)
    fig = heatmap_figure(grid, [1.0, 3.0], [0.0, 2.0], "w_c", "w_d", "fid over w_d x w_c", (1, 0))
    ax, bar = fig.axes  # the map and its colour bar
    labels = [t.get_text() for t in ax.texts]
    # one rounding for the whole map (3 significant digits of the largest value)
    assert labels == ["5.00", "4.00", "2.00", "3.25"]
    assert bar.get_ylabel() == "fid (lower is better)"
    frames = [p for p in ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert len(frames) == 1
    x0, y0 = frames[0].get_xy()
    assert (round(x0 + frames[0].get_width() / 2), round(y0 + frames[0].get_height() / 2)) == (0, 1)
    # the frame sits inside its cell, around the value label (which stays on top, readable)
    assert frames[0].get_width() < 1 and frames[0].get_height() < 1
    # lower is better: the best (smallest) value gets the bright end of viridis
    image = ax.images[0]
    best_rgb = image.cmap(image.norm(2.0))[:3]
    worst_rgb = image.cmap(image.norm(5.0))[:3]
    assert sum(best_rgb) > sum(worst_rgb)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3"]


def test_rounding_is_one_per_map():
    assert decimals_for([0.25, 0.031]) == 3
    assert decimals_for([123.4, 7.0]) == 0
    assert decimals_for([12.0, None, float("nan")]) == 1


def test_summary_heatmap_files(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep", GRID)
    written = summarize(sweep)
    for name in ("heatmap_fid", "heatmap_clip_score"):
        with Image.open(written[name]) as im:
            assert im.size[0] >= 400 and im.size[1] >= 300  # readable, not a 240 px bitmap


def test_montage_layout(tmp_path):
    """Rows w_d, columns w_c; each cell holds its own job's first samples, in file order."""
    sweep = tmp_path / "sweep"
    colours = {}
    for i, (w_d, w_c, _, _) in enumerate(GRID):
        samples = tmp_path / "samples" / str(i)
        samples.mkdir(parents=True)
        for k in range(4):
            colour = (40 * i + 10, 60 * k, 200 - 40 * i)
            colours[(w_d, w_c, k)] = colour
            Image.new("RGB", (32, 32), colour).save(samples / f"{k:04d}.png")
    _fake_sweep(sweep, GRID)
    for i in range(len(GRID)):
        metrics = json.loads((sweep / str(i) / "metrics.json").read_text())
        metrics["samples_dir"] = str(tmp_path / "samples" / str(i))
        (sweep / str(i) / "metrics.json").write_text(json.dumps(metrics))

    written = summarize(sweep, per_cell=2)
    montage = np.asarray(Image.open(written["montage"]).convert("RGB"))
    # the same layout as drawn: recompute the boxes by drawing the cells again
    cells = {
        (r, c): sorted((tmp_path / "samples" / str(2 * r + c)).glob("*.png"))
        for r in range(2)
        for c in range(2)
    }
    _, layout = draw_montage(
        cells, [1.0, 3.0], [0.0, 2.0], "w_c", "w_d", tmp_path / "m.png", per_cell=2,
        title=f"{sweep.name}: first 2 samples per point",
    )  # fmt: skip
    assert montage.shape == np.asarray(Image.open(tmp_path / "m.png")).shape
    for (r, c), (x0, y0) in layout.boxes.items():
        w_d, w_c = (0.0, 2.0)[r], (1.0, 3.0)[c]
        for k in range(2):
            centre = montage[
                y0 + layout.thumb // 2, x0 + k * (layout.thumb + 2) + layout.thumb // 2
            ]
            assert tuple(int(v) for v in centre) == colours[(w_d, w_c, k)]
    # no third sample: per_cell=2
    x0, y0 = layout.boxes[(0, 0)]
    assert montage.shape[1] > x0 + 2 * layout.thumb


def test_cli_prints_table(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep", GRID)
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "best fid" in out and "summary.csv" in out
