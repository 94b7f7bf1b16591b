"""Text control against domain fidelity in the toy world: ours vs the fine-tuning baseline.

    python experiments/toyworld/tradeoff.py --job outputs/toyworld

Reads the finished idgen-eval sweeps (<job>/sweep_ours, <job>/sweep_finetune; see sweep.py)
and the job's base row, and writes <job>/tradeoff.png (colour accuracy vs dark fraction, ours'
Pareto front drawn) and <job>/tradeoff.md (every point, the fronts, the best point with
dark >= 0.9 of each method).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idgen.metrics.sweep_summary import collect
from idgen.utils.io import atomic_write_text, save_figure_atomic

STYLES = {
    "ours": {"color": "tab:blue", "marker": "o"},
    "fine-tuned": {"color": "tab:red", "marker": "s"},
    "fine-tuned (steps)": {"color": "tab:orange", "marker": "D"},
    "base": {"color": "tab:gray", "marker": "*"},
}
LEGEND = {
    "ours": "ours (labels: w_d/w_c)",
    "fine-tuned": "fine-tuning, over its CFG scale (labels: w_c)",
    "fine-tuned (steps)": "fine-tuning, over training steps",
    "base": "base (CFG, no domain)",
}
DARK_TARGET = 0.9


def points(sweep_dir: Path) -> list[dict]:
    """One point per finished sweep job: w_d, w_c, colour, dark, fid, n."""
    out = []
    for job in collect(sweep_dir):
        m, prm = job["metrics"], job["params"]
        out.append(
            {
                "w_d": float(prm.get("sample.w_d", 0.0)),
                "w_c": float(prm.get("sample.w_c", 0.0)),
                "colour": float(m["colour_accuracy"]),
                "dark": float(m["dark_fraction"]),
                "fid": float(m["fid"]) if "fid" in m else None,
                "n": int(m["num_samples"]),
            }
        )
    return out


def pareto_front(pts: list[dict]) -> list[dict]:
    """Points no other point beats on both colour and dark, by increasing dark fraction."""
    front = [
        p
        for p in pts
        if not any(
            q["colour"] >= p["colour"]
            and q["dark"] >= p["dark"]
            and (q["colour"], q["dark"]) != (p["colour"], p["dark"])
            for q in pts
        )
    ]
    return sorted(front, key=lambda p: (p["dark"], -p["colour"]))


def best_in_domain(pts: list[dict], dark: float = DARK_TARGET) -> dict | None:
    """The highest colour accuracy among points with dark fraction >= ``dark``."""
    ok = [p for p in pts if p["dark"] >= dark]
    return max(ok, key=lambda p: (p["colour"], p["dark"])) if ok else None


def draw(series: dict[str, list[dict]], out: Path) -> Path:
    """Colour accuracy (text control) against dark fraction (domain fidelity), one marker per
    point: ours over (w_d, w_c) with its Pareto front, fine-tuning over its CFG scale and over
    its training steps, the base. The dark >= 0.9 region is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=150)
    ax.axvspan(DARK_TARGET, 1.02, color="#e6f2e6", zorder=0, label=f"dark >= {DARK_TARGET}")
    for name, pts in series.items():
        style = STYLES.get(name, {"color": "black", "marker": "x"})
        if not pts:
            continue
        if name == "ours" and len(pts) > 1:
            front = pareto_front(pts)
            ax.plot([p["dark"] for p in front], [p["colour"] for p in front], "-", **style,
                    alpha=0.6, zorder=2)  # fmt: skip
        elif name.startswith("fine-tuned") and len(pts) > 1:
            line = sorted(pts, key=lambda p: p.get("steps", 0) or p["w_c"])
            ax.plot([p["dark"] for p in line], [p["colour"] for p in line], ":", **style,
                    alpha=0.6, zorder=2)  # fmt: skip
        ax.scatter([p["dark"] for p in pts], [p["colour"] for p in pts], s=36, zorder=3,
                   label=LEGEND.get(name, name), **style)  # fmt: skip
        for p in pts:
            if name == "ours":
                text = f"{p['w_d']:g}/{p['w_c']:g}"
            elif "steps" in p:
                text = f"{p['steps']} st"
            elif name == "base":
                continue
            else:
                text = f"{p['w_c']:g}"
            ax.annotate(text, (p["dark"], p["colour"]), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color=style["color"])  # fmt: skip
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("domain fidelity: fraction of samples on a dark background")
    ax.set_ylabel("text control: colour accuracy on the colour prompts")
    ax.set_title("Toy world: text control vs domain fidelity (validation seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, out)


def _row(name: str, p: dict) -> str:
    fid = "-" if p.get("fid") is None else f"{p['fid']:.3f}"
    return f"| {name} | {p['w_d']:g} | {p['w_c']:g} | {p['colour']:.3f} | {p['dark']:.3f} | {fid} | {p['n']} |"


def write_tradeoff(
    sweeps: dict[str, Path],
    job: Path,
    finetune_steps: dict[int, Path] | None = None,
    job_budget: tuple[int, float] | None = None,
) -> dict[str, Path]:
    """tradeoff.png + tradeoff.md from finished sweeps (name -> sweep dir), the baseline's
    training-steps sweeps (steps -> sweep dir; ``job_budget`` = the job's (steps, w_c), read
    from the CFG-scale sweep) and the job's base row (results.json)."""
    series = {name: points(path) for name, path in sweeps.items()}
    if finetune_steps:
        series["fine-tuned (steps)"] = [
            {**p, "steps": steps}
            for steps, path in sorted(finetune_steps.items())
            for p in points(path)
        ]
    if finetune_steps and job_budget is not None:
        # the job's own budget, from the CFG-scale sweep (same validation seeds) at its w_c
        steps, w_c = job_budget
        series["fine-tuned (steps)"] += [
            {**p, "steps": steps} for p in series.get("fine-tuned", []) if p["w_c"] == w_c
        ]
    results = job / "results.json"
    if results.is_file():  # the job's base row: CFG on the base, no domain term
        base = json.loads(results.read_text())
        row, s = base["rows"]["base"], base["settings"]
        series["base"] = [
            {
                "w_d": 0.0,
                "w_c": s["w_c"],
                "colour": row["colour_accuracy"],
                "dark": row["dark_fraction"],
                "fid": row.get("fid"),
                "n": row["num_samples"],
            }
        ]
    header = [
        "| method | w_d | w_c | colour acc | dark fraction | FID (tiny) | n |",
        "|---|---|---|---|---|---|---|",
    ]
    md = ["# Toy world trade-off: text control vs domain fidelity", ""]
    md.append(f"Best colour accuracy with dark fraction >= {DARK_TARGET}:")
    md.append("")
    md += header
    for name, pts in series.items():
        b = best_in_domain(pts)
        md.append(
            _row(name, b) if b else f"| {name} | - | - | none reaches dark >= {DARK_TARGET} | | | |"
        )
    md += ["", "Pareto fronts (no point of the same method is better on both axes):", ""] + header
    for name, pts in series.items():
        md += [_row(name, p) for p in pareto_front(pts)]
    md += ["", "Every point:", ""] + header
    for name, pts in series.items():
        md += [_row(name, p) for p in sorted(pts, key=lambda p: (p["w_d"], p["w_c"]))]
    md += [
        "",
        "FID uses the tiny random-conv extractor (NOT Inception FID).",
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]
    return {
        "png": draw(series, job / "tradeoff.png"),
        "markdown": atomic_write_text(job / "tradeoff.md", "\n".join(md)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=Path("outputs/toyworld"))
    args = p.parse_args()
    job = args.job.resolve()
    written = write_tradeoff(
        {"ours": job / "sweep_ours", "fine-tuned": job / "sweep_finetune"}, job
    )
    print(written["markdown"].read_text())


if __name__ == "__main__":
    main()
