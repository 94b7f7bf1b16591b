"""Print a Table-1-shaped table (paper §4.4) from idgen-eval run folders.

Layout: <root>/<method>/<column>/metrics.json, where <column> is one of
  face_fid, animal_fid, porcelain_fid   (metrics=inception, 50k samples vs the domain set)
  text_align                            (metrics=face_attributes: 10 prompts x 100 images)
  spatial_align                         (metrics=canny: 200 CelebA-HQ canny conditions)
A missing run prints "-". Every score is printed with its sample count (n).

    python experiments/aggregate_table1.py outputs/table1 [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# column -> (header, metric key, count key)
COLUMNS = {
    "face_fid": ("Face FID↓", "fid", "num_samples"),
    "animal_fid": ("Animal FID↓", "fid", "num_samples"),
    "porcelain_fid": ("Porcelain FID↓", "fid", "num_samples"),
    "text_align": ("Text Align.↑", "attribute_alignment", "attribute_num_samples"),
    "spatial_align": ("Spatial Align.↓", "canny_discrepancy", "canny_num_samples"),
}
# the paper's row order; other method folders follow alphabetically
PAPER_ORDER = ["textual_inversion", "custom_diffusion", "oft", "finetune", "finetune_lora", "ours"]


def cell(run_dir: Path, key: str, count: str) -> str:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return "-"
    metrics = json.loads(path.read_text())
    if key not in metrics:
        return "-"
    return f"{metrics[key]:.2f} (n={metrics.get(count, '?')})"


def table(root: Path) -> list[list[str]]:
    methods = [d.name for d in root.iterdir() if d.is_dir()]
    methods.sort(key=lambda m: (PAPER_ORDER.index(m) if m in PAPER_ORDER else len(PAPER_ORDER), m))
    rows = [["Method", *(h for h, _, _ in COLUMNS.values())]]
    for m in methods:
        rows.append([m, *(cell(root / m / c, k, n) for c, (_, k, n) in COLUMNS.items())])
    return rows


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Table-1-shaped summary of idgen-eval runs")
    parser.add_argument("root", type=Path, help="folder with <method>/<column>/metrics.json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(f"'{args.root}' is not a folder of <method>/<column>/ run dirs")
    print(render(table(args.root), args.markdown))


if __name__ == "__main__":
    main()
