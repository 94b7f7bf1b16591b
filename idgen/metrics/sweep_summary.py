"""Summarise a Hydra multirun of idgen-eval: summary.csv, summary.md, heatmaps and a montage.

Usage: ``python -m idgen.metrics.sweep_summary <sweep_dir> [--x sample.w_c] [--y sample.w_d]``

Each job folder of the sweep holds ``metrics.json`` (written by idgen-eval) and
``.hydra/overrides.yaml`` (written by Hydra); the swept overrides become the table columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from pathlib import Path

import yaml

from idgen.metrics.heatmap import draw_montage, heatmap_figure
from idgen.metrics.images import ImageFolderError, list_images
from idgen.metrics.results import METRICS_FILE
from idgen.utils.io import atomic_write_text, save_figure_atomic

# Which direction is better for each metric the heatmaps and "best" use.
LOWER_IS_BETTER = {"fid": True, "kid_mean": True, "canny_discrepancy": True}
HIGHER_IS_BETTER = {
    "clip_score": True,
    "attribute_alignment": True,
    # the toy world (metrics=toyworld): text control and domain fidelity
    "colour_accuracy": True,
    "dark_fraction": True,
}
HEATMAP_METRICS = (
    "fid",
    "kid_mean",
    "clip_score",
    "attribute_alignment",
    "canny_discrepancy",
    "colour_accuracy",
    "dark_fraction",
)


def _value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_job(job_dir: Path) -> dict | None:
    """{"job": name, "params": {override: value}, "metrics": {...}} or None if unfinished."""
    metrics_file = job_dir / METRICS_FILE
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    params: dict = {}
    overrides = job_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        for item in yaml.safe_load(overrides.read_text()) or []:
            key, _, value = str(item).partition("=")
            params[key.lstrip("+~")] = _value(value)
    return {"job": job_dir.name, "params": params, "metrics": metrics}


def collect(sweep_dir: str | os.PathLike) -> list[dict]:
    """Finished jobs of a sweep, in job order (Hydra names job folders 0, 1, 2...)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder '{sweep_dir}' does not exist.")
    jobs = [read_job(d) for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    jobs = [j for j in jobs if j is not None]
    if not jobs:
        raise FileNotFoundError(
            f"no job in '{sweep_dir}' has a {METRICS_FILE}: did the sweep run idgen-eval?"
        )
    return sorted(jobs, key=lambda j: (len(j["job"]), j["job"]))


def _scalar_metrics(jobs: list[dict]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        for k, v in job["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    return keys


def _param_keys(jobs: list[dict]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job["params"] if k not in keys]
    # only what varies across jobs is a sweep axis; constant overrides are noise in the table
    return [k for k in keys if len({repr(j["params"].get(k)) for j in jobs}) > 1] or keys


def best_job(jobs: list[dict], metric: str) -> dict | None:
    scored = [j for j in jobs if _finite(j["metrics"].get(metric))]
    if not scored:
        return None
    pick = max if metric in HIGHER_IS_BETTER else min
    return pick(scored, key=lambda j: j["metrics"][metric])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pick_axes(params: list[str], x: str | None, y: str | None) -> tuple[str, str] | None:
    def find(suffix: str) -> str | None:
        return next((p for p in params if p.split(".")[-1] == suffix), None)

    x = x or find("w_c")
    y = y or find("w_d")
    rest = [p for p in params if p not in (x, y)]
    x = x or (rest.pop(0) if rest else None)
    y = y or (rest.pop(0) if rest else None)
    return (x, y) if x and y else None


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def grid_of(jobs: list[dict], metric: str, x: str, y: str):
    """(grid[y][x], x values, y values, best (row, col)) for ``metric``; means over other axes' duplicates."""
    xs = sorted({j["params"].get(x) for j in jobs}, key=_sort_key)
    ys = sorted({j["params"].get(y) for j in jobs}, key=_sort_key)
    cells: dict[tuple, list[float]] = {}
    for j in jobs:
        v = j["metrics"].get(metric)
        if _finite(v):
            cells.setdefault((j["params"].get(y), j["params"].get(x)), []).append(float(v))
    grid = [
        [(sum(cells[(yv, xv)]) / len(cells[(yv, xv)])) if (yv, xv) in cells else None for xv in xs]
        for yv in ys
    ]
    scored = [(r, c) for r in range(len(ys)) for c in range(len(xs)) if grid[r][c] is not None]
    if not scored:
        return grid, xs, ys, None
    pick = max if metric in HIGHER_IS_BETTER else min
    best = pick(scored, key=lambda rc: grid[rc[0]][rc[1]])
    return grid, xs, ys, best


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(jobs: list[dict], params: list[str], metrics: list[str]) -> str:
    header = ["job", *params, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j in jobs:
        row = [
            j["job"],
            *(_fmt(j["params"].get(p)) for p in params),
            *(_fmt(j["metrics"].get(m)) for m in metrics),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def montage_cells(jobs: list[dict], x: str, y: str) -> tuple[dict, list, list]:
    """(cells[(row, col)] = that job's sample files, x values, y values); first job per cell."""
    xs = sorted({j["params"].get(x) for j in jobs}, key=_sort_key)
    ys = sorted({j["params"].get(y) for j in jobs}, key=_sort_key)
    cells: dict[tuple[int, int], list[Path]] = {}
    for j in jobs:
        where = (ys.index(j["params"].get(y)), xs.index(j["params"].get(x)))
        folder = j["metrics"].get("samples_dir")
        if where in cells or not folder:
            continue
        try:
            cells[where] = list_images(folder, "samples folder")
        except ImageFolderError:  # moved or deleted since: that cell stays blank
            continue
    return cells, xs, ys


def summary_csv(jobs: list[dict], params: list[str], metrics: list[str]) -> str:
    """summary.csv's text: a header, then one row per job (its swept params and metrics)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["job", *params, *metrics])
    for j in jobs:
        writer.writerow(
            [
                j["job"],
                *(j["params"].get(p, "") for p in params),
                *(j["metrics"].get(m, "") for m in metrics),
            ]
        )
    return buf.getvalue()


def best_points(jobs: list[dict], params: list[str]) -> list[str]:
    """A markdown bullet per heatmap metric some job scored: its best value and where."""
    lines = []
    for m in HEATMAP_METRICS:
        b = best_job(jobs, m)
        if b is not None:
            where = ", ".join(f"{p}={b['params'].get(p)}" for p in params)
            n = b["metrics"].get("num_samples")
            lines.append(
                f"- best {m}: **{_fmt(b['metrics'][m])}** at {where} (job {b['job']}, n={n})"
            )
    return lines


def summary_markdown(
    name: str, jobs: list[dict], params: list[str], metrics: list[str]
) -> list[str]:
    """summary.md's lines before the figures: title, job count, best points, the full table."""
    head = [f"# Sweep summary: {name}", "", f"{len(jobs)} finished jobs.", ""]
    return [*head, *best_points(jobs, params), "", markdown_table(jobs, params, metrics), ""]


def write_heatmaps(sweep_dir: Path, jobs: list[dict], x: str, y: str) -> dict[str, Path]:
    """heatmap_<metric>.png over ``y`` x ``x`` for each heatmap metric some job scored, best
    cell framed; returns the written paths by metric."""
    written: dict[str, Path] = {}
    for m in HEATMAP_METRICS:
        if not any(_finite(j["metrics"].get(m)) for j in jobs):
            continue
        grid, xs, ys, best = grid_of(jobs, m, x, y)
        better = "higher" if m in HIGHER_IS_BETTER else "lower"
        title = f"{m} ({better} is better) over {y} x {x}"
        fig = heatmap_figure(
            grid, xs, ys, x, y, title, best, higher_is_better=m in HIGHER_IS_BETTER
        )
        written[m] = save_figure_atomic(fig, sweep_dir / f"heatmap_{m}.png")
    return written


def write_montage(sweep_dir: Path, jobs: list[dict], x: str, y: str, per_cell: int) -> Path | None:
    """montage.png: the first ``per_cell`` samples of every grid point (same seeds in every
    cell); None when no job's samples folder is found."""
    cells, xs, ys = montage_cells(jobs, x, y)
    per_cell = min(per_cell, max((len(files) for files in cells.values()), default=0))
    if not (cells and per_cell):
        return None
    path, _ = draw_montage(
        cells, xs, ys, x.split(".")[-1], y.split(".")[-1], sweep_dir / "montage.png",
        per_cell=per_cell, title=f"{sweep_dir.name}: first {per_cell} samples per point",
    )  # fmt: skip
    return path


def image_links(images: dict[str, Path]) -> list[str]:
    """Markdown lines showing each image (named by its key) from beside it, a blank after each."""
    return [line for name, path in images.items() for line in (f"![{name}]({path.name})", "")]


def summarize(
    sweep_dir: str | os.PathLike,
    x: str | None = None,
    y: str | None = None,
    per_cell: int = 3,
) -> dict[str, Path]:
    """Write summary.csv, summary.md, heatmap_<metric>.png and montage.png into ``sweep_dir``.

    Returns the written paths by name (``csv``, ``markdown``, ``heatmap_<metric>``, ``montage``).
    """
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    params = _param_keys(jobs)
    metrics = _scalar_metrics(jobs)
    written: dict[str, Path] = {}

    # 1. one csv row per job
    written["csv"] = atomic_write_text(
        sweep_dir / "summary.csv", summary_csv(jobs, params, metrics)
    )

    # 2. markdown: best points, then the full table
    md = summary_markdown(sweep_dir.name, jobs, params, metrics)

    # 3. heatmaps over the two grid axes, best cell framed
    axes = _pick_axes(params, x, y)
    if axes is not None:
        heatmaps = write_heatmaps(sweep_dir, jobs, *axes)
        written.update({f"heatmap_{m}": path for m, path in heatmaps.items()})
        md += image_links(heatmaps)

        # 4. montage: the first samples of every grid point (same seeds in every cell)
        montage = write_montage(sweep_dir, jobs, *axes, per_cell)
        if montage is not None:
            written["montage"] = montage
            md += image_links({"montage": montage})
    written["markdown"] = atomic_write_text(sweep_dir / "summary.md", "\n".join(md))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a Hydra multirun folder of idgen-eval jobs")
    parser.add_argument("--x", help="override name on the x axis (default: the one ending in w_c)")
    parser.add_argument("--y", help="override name on the y axis (default: the one ending in w_d)")
    parser.add_argument("--per-cell", type=int, default=3, help="samples per montage cell")
    args = parser.parse_args(argv)
    written = summarize(args.sweep_dir, args.x, args.y, args.per_cell)
    print((Path(args.sweep_dir) / "summary.md").read_text())
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
