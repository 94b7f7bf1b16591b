"""A 2x2 w_d x w_c multirun of idgen-eval writes per-job metrics and the sweep summary.

The sampling step is a stand-in module (tests/conftest.py: STAND_IN_SAMPLER) that accepts the same
overrides (sampler.w_d, sampler.w_c, hydra.run.dir) and brightens its images with the weights,
so FID over the grid has a known best point: the smallest weights.
"""

from __future__ import annotations

import csv


def test_guidance_grid_multirun_writes_summary(tmp_path, stand_in_sweep):
    sweep = tmp_path / "sweep"
    stand_in_sweep(
        "guidance_grid", sweep, "~logger", "sample.w_d=0,2", "sample.w_c=1,3", num_images=8
    )

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4 and all((j / "metrics.json").is_file() for j in jobs)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    grid = {(float(r["sample.w_d"]), float(r["sample.w_c"])): float(r["fid"]) for r in rows}
    assert set(grid) == {(0.0, 1.0), (0.0, 3.0), (2.0, 1.0), (2.0, 3.0)}
    assert min(grid, key=grid.get) == (0.0, 1.0)
    assert grid[(0.0, 1.0)] < grid[(0.0, 3.0)] < grid[(2.0, 3.0)]
    md = (sweep / "summary.md").read_text()
    assert "best fid" in md and "sample.w_d=0, sample.w_c=1 (job 0, n=8)" in md
    for name in ("heatmap_fid.png", "heatmap_kid_mean.png"):
        assert (sweep / name).stat().st_size > 0
    assert all(int(r["num_samples"]) == 8 for r in rows)
