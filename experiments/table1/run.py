"""The toy Table 1 (paper §4.4) in one command: every method trained, sampled and evaluated.

    python experiments/table1/run.py --out outputs/table1

Rows: the base, textual inversion, Custom Diffusion, OFT, fine-tuning, fine-tuning + LoRA and
ours, trained on the same domain folder (shapes on dark backgrounds, unlabeled) with the same
batch and steps (``idgen/conf/experiment/toyworld*.yaml``). Columns: #param; domain fidelity (dark
fraction and the small-extractor FID of samples of the domain prompt against the domain set);
text alignment (colour accuracy and dark fraction on the 12 colour x shape prompts); spatial
alignment (mask IoU and dark fraction with the toy ControlNet in the control term, for every
row: ours as the paper does, the base and the baselines with their own UNet under it). All
rows use the main job's guidance (``python -m idgen.toyworld.job``'s defaults) and the same
seeds. Writes ``<out>/table1.md``, ``table1.json`` and ``table1.png`` (rows = methods, columns =
prompts and conditions); every stage is an idgen-train / idgen-sample / idgen-eval run under
``<out>`` and a rerun resumes (trained models kept, finished images skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe import (  # noqa: E402
    ROWS,
    Trained,
    ensure_domain,
    evaluate,
    method_prompt,
    sample,
    train,
)

from idgen.data.images import load_rgb  # noqa: E402
from idgen.toyworld import job  # noqa: E402
from idgen.toyworld.conditions import write_conditions  # noqa: E402
from idgen.toyworld.figure import sample_path  # noqa: E402
from idgen.toyworld.render import SHAPES, all_captions  # noqa: E402
from idgen.utils.io import atomic_write_text, save_image_atomic  # noqa: E402
from idgen.utils.timing import StageTimer  # noqa: E402

log = logging.getLogger("table1")

# (metric key, header) of table1.md, per column run
TABLE = {
    "fidelity": (("dark_fraction", "dark ↑"), ("fid", "FID ↓")),
    "text_align": (("colour_accuracy", "colour acc ↑"), ("dark_fraction", "dark ↑")),
    "spatial_align": (("mask_iou", "mask IoU ↑"), ("dark_fraction", "dark ↑")),
}
GROUPS = {
    "fidelity": "domain prompt",
    "text_align": "colour x shape prompts",
    "spatial_align": "+ toy ControlNet",
}
# Conditions are drawn from their own seeds, away from the domain set's.
CONDITION_SEED = 900_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    main_job = job.parse_args([])  # the main job's guidance and sampling: one documented setting
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/table1"), help="output folder")
    p.add_argument("--methods", nargs="+", default=ROWS, choices=ROWS, help="rows (default all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every method")
    p.add_argument("--inversion-steps", type=int, default=None, help="ours' stage 1 steps")
    p.add_argument("--w-d", type=float, default=main_job.w_d, help="ours' domain weight")
    p.add_argument("--w-c", type=float, default=main_job.w_c, help="control weight (every row)")
    p.add_argument("--sample-steps", type=int, default=main_job.sample_steps)
    p.add_argument("--domain-samples", type=int, default=48, help="samples of the domain prompt")
    p.add_argument("--images-per-prompt", type=int, default=4, help="x 12 colour/shape prompts")
    p.add_argument("--conditions", type=int, default=12, help="ControlNet masks")
    p.add_argument("--per-condition", type=int, default=4, help="samples per mask")
    p.add_argument("--controlnet", default=None, help="ControlNet folder (default: shipped)")
    p.add_argument("--base", default=None, help="toy base folder (default: shipped)")
    p.add_argument("--batch-size", type=int, default=24, help="images per sampling call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.lr = None  # each method keeps its experiment's learning rate (job.training_overrides)
    args.family = "sd15"  # Table 1's baselines and ControlNet row are SD1.5's (job.model_overrides)
    for name in ("domain_samples", "images_per_prompt", "conditions", "per_condition"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def sample_text(args: argparse.Namespace, trained: Trained) -> dict[str, Path]:
    """The domain prompt and the 12 colour x shape prompts of one row; their image folders."""
    root = args.out.resolve() / "samples" / trained.name
    return {
        "fidelity": sample(
            args, trained, root / "fidelity",
            [method_prompt(None, trained)], args.domain_samples,
        ),
        "text_align": sample(
            args, trained, root / "text_align",
            [method_prompt(c, trained) for c in all_captions()], args.images_per_prompt,
        ),
    }  # fmt: skip


def sample_spatial(
    args: argparse.Namespace, trained: Trained, conditions: list[dict], cond_dir: Path
) -> Path:
    """One idgen-sample run per condition mask (its own caption); the folder holding them all."""
    root = args.out.resolve() / "samples" / trained.name / "spatial_align"
    for record in conditions:
        sample(
            args,
            trained,
            root / Path(record["file"]).stem,
            [method_prompt(record["caption"], trained)],
            args.per_condition,
            control_image=cond_dir / record["file"],
        )
    return root  # idgen-eval searches it recursively


def row_entry(args: argparse.Namespace, trained: Trained, folders: dict[str, Path]) -> dict:
    """Evaluate one row's columns (idgen-eval); its table entry."""
    metrics = {c: evaluate(args, trained.name, c, folder) for c, folder in folders.items()}
    return {
        "num_params": trained.num_params,
        "budget": trained.budget,
        "prompt_example": method_prompt(all_captions()[0], trained),
        "metrics": {
            column: {k: v for k, v in m.items() if isinstance(v, int | float | str)}
            for column, m in metrics.items()
        },
        "samples": {column: str(folder) for column, folder in folders.items()},
    }


def table_markdown(results: dict) -> str:
    """table1.md: one row per method, each score with its sample count."""
    head = ["Method", "#param"] + [
        f"{header} ({GROUPS[column]})" for column, cells in TABLE.items() for _, header in cells
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["rows"].items():
        cells = [name, f"{row['num_params']:,}" if row["num_params"] else "0 (frozen)"]
        for column, keys in TABLE.items():
            m = row["metrics"][column]
            cells += [f"{m[k]:.3f}" if k in m else "-" for k, _ in keys]
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    n = {c: next(iter(results["rows"].values()))["metrics"][c]["num_samples"] for c in TABLE}
    lines += [
        "",
        f"n = {n['fidelity']} / {n['text_align']} / {n['spatial_align']} samples per row"
        " (domain prompt / colour prompts / ControlNet). Fidelity: dark = fraction of dark"
        " backgrounds, FID with the tiny random-conv extractor against the domain set (compare"
        " rows only). Text: colour accuracy against the prompt (chance 0.25). Spatial: IoU of the"
        " sample's foreground with the condition mask.",
        f"Guidance: w_c = {s['w_c']} for every row (classifier-free guidance for base and"
        f" baselines), ours w_d = {s['w_d']}; DPM-Solver++ {s['sample_steps']} steps; same seeds"
        " for every row. Baselines are prompted `a photo of [V] <domain>`, the domain words"
        " replaced by the caption"
        + "".join(f" (`{e}`)" for n, e in s["prompt_examples"].items() if n == "textual_inversion")
        + ".",
        "Training: " + budget_line(s["budgets"]) + ".",
        f"Time: {results['timings_s']['total'] / 60:.1f} min on {s['threads']} thread(s),"
        f" {results['cpu_count']} CPUs (load average at start {results['load_average']:.1f}).",
    ]
    return "\n".join(lines) + "\n"


def budget_line(budgets: dict[str, dict]) -> str:
    """``steps 200 at batch 32 on 1024 images; lr: oft 0.001, ...`` (shared terms said once)."""
    if not budgets:
        return "nothing trained"
    shared = {(b["steps"], b["batch_size"], b["num_images"]) for b in budgets.values()}
    lrs = ", ".join(f"{n} {b['lr']:g}" for n, b in budgets.items())
    inversion = {n: b["inversion_steps"] for n, b in budgets.items() if b["inversion_steps"]}
    extra = "".join(f"; {n} + {k} inversion steps" for n, k in inversion.items())
    if len(shared) == 1:
        steps, batch, images = shared.pop()
        return (
            f"{steps} steps at batch {batch} on {images} images for every method{extra}; lr: {lrs}"
        )
    return f"budgets differ: {budgets}"


def figure(
    results: dict, conditions: list[dict], cond_dir: Path, out: Path, scale: int = 3
) -> Path:
    """table1.png: rows = methods; columns = the domain prompt, 4 colour prompts, 4 conditions."""
    captions = all_captions()
    picks = [i * len(SHAPES) + i % len(SHAPES) for i in range(4)]  # every colour, varied shapes
    shown = conditions[:4]
    side, pad, label_w, header_h = 32 * scale, 4, 110, 32 + 32 * scale
    columns = 1 + len(picks) + len(shown)
    width = label_w + columns * (side + pad) + pad
    height = header_h + len(results["rows"]) * (side + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = [label_w + pad + c * (side + pad) for c in range(columns)]
    draw.text((x0[0], 3), "domain\nprompt", fill="black")
    for c, i in enumerate(picks, start=1):
        draw.text((x0[c], 3), captions[i].removeprefix("a ").replace(" ", "\n", 1), fill="black")
    for c, record in enumerate(shown, start=1 + len(picks)):
        draw.text(
            (x0[c], 3), record["caption"].removeprefix("a ").replace(" ", "\n", 1), fill="black"
        )
        mask = load_rgb(cond_dir / record["file"]).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(mask, (x0[c], 28))
    for r, (name, row) in enumerate(results["rows"].items()):
        y = header_h + pad + r * (side + pad)
        draw.text((4, y + side // 2 - 6), name, fill="black")
        paths = [sample_path(Path(row["samples"]["fidelity"]), 0, 0, 1)]
        per = results["settings"]["images_per_prompt"]
        paths += [sample_path(Path(row["samples"]["text_align"]), i, 0, per) for i in picks]
        spatial = Path(row["samples"]["spatial_align"])
        paths += [
            sample_path(spatial / Path(rec["file"]).stem / "samples", 0, 0, 1) for rec in shown
        ]
        for c, path in enumerate(paths):
            image = load_rgb(path).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(image, (x0[c], y))
    return save_image_atomic(canvas, out)


def run(args: argparse.Namespace) -> dict:
    """Every row in the paper's order; writes table1.json / table1.md / table1.png."""
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    ensure_domain(args)
    cond_dir = out / "conditions"
    # Masks of domain-world objects, every shape in turn; each sampled with its own caption.
    conditions = write_conditions(
        cond_dir, args.conditions, 32, seed=CONDITION_SEED + args.seed, shapes=SHAPES
    )
    names = [r for r in ROWS if r in args.methods]
    timer = StageTimer()

    # Stage by stage (every row trained before any is sampled; spatial control last), so a
    # run stopped anywhere resumes where it stopped.
    trained = {n: timer.run("train", train, args, n) for n in names}
    folders = {n: timer.run("sample text", sample_text, args, trained[n]) for n in names}
    for n in names:
        folders[n]["spatial_align"] = timer.run(
            "sample spatial", sample_spatial, args, trained[n], conditions, cond_dir
        )
    rows = {n: timer.run("evaluate", row_entry, args, trained[n], folders[n]) for n in names}
    timings = {**timer.seconds, "total": round(time.perf_counter() - start, 1)}
    results = {
        "rows": rows,
        "settings": {
            "w_d": args.w_d,
            "w_c": args.w_c,
            "sample_steps": args.sample_steps,
            "images_per_prompt": args.images_per_prompt,
            "domain_samples": args.domain_samples,
            "conditions": args.conditions,
            "per_condition": args.per_condition,
            "controlnet": args.controlnet or "idgen/toyworld/controlnet (shipped)",
            "base": args.base or "idgen/toyworld/base (shipped)",
            "threads": args.threads,
            "seed": args.seed,
            "budgets": {n: r["budget"] for n, r in rows.items() if r["budget"]},
            "prompt_examples": {n: r["prompt_example"] for n, r in rows.items()},
        },
        "timings_s": timings,
        "load_average": load,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    atomic_write_text(out / "table1.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "table1.md", table_markdown(results))
    results["figure"] = str(figure(results, conditions, cond_dir, out / "table1.png"))
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    results = run(parse_args(argv))
    print(table_markdown(results))
    return results


if __name__ == "__main__":
    main()
