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

from PIL import Image, ImageDraw

from idgen.metrics.sweep_summary import collect
from idgen.utils.io import atomic_write_text, save_image_atomic

COLOURS = {"ours": (40, 90, 220), "fine-tuned": (220, 60, 40), "base": (120, 120, 120)}
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


def draw(series: dict[str, list[dict]], out: Path, size: int = 520) -> Path:
    margin = 60
    image = Image.new("RGB", (size + 2 * margin, size + 2 * margin), "white")
    d = ImageDraw.Draw(image)

    def xy(p):  # dark fraction -> x, colour accuracy -> y (up)
        return margin + p["dark"] * size, margin + (1 - p["colour"]) * size

    # 1. axes, grid and the dark >= 0.9 region
    d.rectangle(
        [margin + DARK_TARGET * size, margin, margin + size, margin + size], fill=(238, 246, 238)
    )
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line(
            [margin, margin + (1 - v) * size, margin + size, margin + (1 - v) * size],
            fill=(225, 225, 225),
        )
        d.line([margin + v * size, margin, margin + v * size, margin + size], fill=(225, 225, 225))
        d.text((margin - 30, margin + (1 - v) * size - 6), f"{v:.2f}", fill="black")
        d.text((margin + v * size - 10, margin + size + 6), f"{v:.2f}", fill="black")
    d.rectangle([margin, margin, margin + size, margin + size], outline="black")
    d.text(
        (margin + size // 2 - 90, margin + size + 24),
        "domain fidelity (dark fraction)",
        fill="black",
    )
    d.text((6, margin - 24), "text control (colour accuracy)", fill="black")
    # 2. each method's points; ours' Pareto front as a line
    for name, pts in series.items():
        colour = COLOURS.get(name, (0, 0, 0))
        if name == "ours" and len(pts) > 1:
            d.line([xy(p) for p in pareto_front(pts)], fill=colour, width=2)
        for p in pts:
            x, y = xy(p)
            box = [x - 4, y - 4, x + 4, y + 4]
            d.ellipse(box, fill=colour) if name == "ours" else d.rectangle(box, fill=colour)
            if name != "base":
                label = f"{p['w_d']:g}/{p['w_c']:g}" if name == "ours" else f"{p['w_c']:g}"
                d.text((x + 5, y - 12), label, fill=colour)
    # 3. legend
    for i, name in enumerate(series):
        y = margin + 8 + 16 * i
        d.rectangle([margin + 8, y, margin + 16, y + 8], fill=COLOURS.get(name, (0, 0, 0)))
        d.text(
            (margin + 22, y - 3),
            {"ours": "ours (w_d/w_c)", "fine-tuned": "fine-tuned (w_c)"}.get(name, name),
            fill="black",
        )
    return save_image_atomic(image, out)


def _row(name: str, p: dict) -> str:
    fid = "-" if p.get("fid") is None else f"{p['fid']:.3f}"
    return f"| {name} | {p['w_d']:g} | {p['w_c']:g} | {p['colour']:.3f} | {p['dark']:.3f} | {fid} | {p['n']} |"


def write_tradeoff(sweeps: dict[str, Path], job: Path) -> dict[str, Path]:
    series = {name: points(path) for name, path in sweeps.items()}
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
