"""Toy-world text-to-3D (a measurable Fig. 10): SDS with the domain model vs SDS with the base alone.

    python experiments/text_to_3d/demo.py --out outputs/text_to_3d

1. The toy domain model: ``idgen-train experiment=toyworld`` through the toy-world job's own
   stage (``idgen.toyworld.job.train_ours``), or ``--domain-model <export>``. It is kept under a
   folder named after the toy base's weights, so a replaced base retrains it.
2. For each prompt, two ``idgen-3d`` runs from the same seed: ``ours`` (domain term ``--w-d``, text
   term ``--w-c``) and ``base`` (``sds.w_d=0``: plain CFG-SDS with the same ``w_c``).
3. The toy metrics of each run's evaluation views (every azimuth around the object): dark
   fraction (the domain) and colour accuracy against the prompt's colour; ``results.json``,
   ``results.md`` and ``comparison.png`` (rows: ours, base per prompt).

Rerunning resumes: trained models are kept, finished 3D runs only rewrite their outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idgen.text_to_3d import text_to_3d
from idgen.toyworld import BASE_DIR
from idgen.toyworld.job import compose_run
from idgen.toyworld.job import parse_args as job_args
from idgen.utils.io import atomic_write_text, save_image_atomic

ARMS = ("ours", "base")


def base_fingerprint(base: Path = BASE_DIR) -> str:
    """Short hash of the toy base's UNet and VAE weights (a new base gets new folders)."""
    digest = hashlib.sha256()
    for part in ("unet", "vae"):
        digest.update((base / part / "diffusion_pytorch_model.safetensors").read_bytes())
    return digest.hexdigest()[:10]


def domain_model(args: argparse.Namespace, root: Path) -> Path:
    """The given export, or the toy world's domain model trained (once) under ``root``."""
    if args.domain_model is not None:
        return args.domain_model
    from idgen.toyworld.job import train_ours

    export, _ = train_ours(job_args(["--out", str(root / "toyworld"), "--seed", str(args.seed)]))
    return export


def overrides(args: argparse.Namespace, arm: str, prompt: str, domain: Path) -> list[str]:
    """The idgen-3d command line of one run (also written to results.json)."""
    weights = [f"domain_model={domain}", f"sds.w_d={args.w_d}"] if arm == "ours" else ["sds.w_d=0"]
    return [
        "model=toyworld",
        "scene=toyworld",
        "sds=toyworld",
        f"prompt='{prompt}'",
        *weights,
        f"sds.w_c={args.w_c}",
        f"steps={args.steps}",
        f"eval.num_views={args.num_views}",
        "eval.toyworld=true",
        f"seed={args.seed}",
        "progress_bar=false",
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/text_to_3d"), help="output folder")
    p.add_argument(
        "--prompts",
        nargs="+",
        default=[f"a {c} circle" for c in ("red", "green", "blue", "yellow")],
    )
    p.add_argument("--steps", type=int, default=150, help="SDS steps per run")
    p.add_argument("--w-d", type=float, default=1.5, help="domain weight of ours")
    p.add_argument("--w-c", type=float, default=5.0, help="text weight (both arms)")
    p.add_argument("--num-views", type=int, default=8, help="evaluation views per run")
    p.add_argument("--domain-model", type=Path, default=None, help="skip training: this export")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Both arms for every prompt; returns what results.json holds."""
    torch.set_num_threads(args.threads)
    fingerprint = base_fingerprint()
    root = args.out.resolve() / f"base-{fingerprint}"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    domain = domain_model(args, root)
    timings = {"domain model (cpu s)": round(time.process_time() - cpu0, 1)}
    runs: dict[str, dict[str, dict]] = {arm: {} for arm in ARMS}
    rows = []
    for i, prompt in enumerate(args.prompts):
        for arm in ARMS:
            run_dir = root / "runs" / f"{i:02d}-{arm}"
            cfg = compose_run("3d", run_dir, overrides(args, arm, prompt, domain))
            cpu = time.process_time()
            summary = text_to_3d(cfg)
            runs[arm][prompt] = {
                **summary["toyworld"],
                "background": summary["background"],
                "seconds": summary["seconds"],
                "cpu_seconds": round(time.process_time() - cpu, 1),
                "run_dir": str(run_dir),
                "overrides": overrides(args, arm, prompt, domain),
            }
            rows.append(np.asarray(Image.open(run_dir / "views.png").convert("RGB")))
    figure = save_image_atomic(
        Image.fromarray(np.concatenate(rows, axis=0)), root / "comparison.png"
    )
    mean = {
        arm: {
            key: float(np.mean([r[key] for r in runs[arm].values()]))
            for key in ("dark_fraction", "colour_accuracy", "no_object_rate")
        }
        for arm in ARMS
    }
    timings["total cpu s"] = round(time.process_time() - cpu0, 1)
    timings["total wall s"] = round(time.perf_counter() - wall0, 1)
    results = {
        "mean": mean,
        "runs": runs,
        "settings": {
            "prompts": list(args.prompts),
            "steps": args.steps,
            "w_d": args.w_d,
            "w_c": args.w_c,
            "num_views": args.num_views,
            "seed": args.seed,
            "threads": args.threads,
            "domain_model": str(domain),
            "base_fingerprint": fingerprint,
        },
        "timings": timings,
        "load_average_end": list(os.getloadavg()),
        "figure": str(figure),
    }
    atomic_write_text(root / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(root / "results.md", results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# Toy-world text-to-3D: {len(s['prompts'])} prompts x {s['num_views']} views, "
        f"{s['steps']} SDS steps, w_c = {s['w_c']} (ours: w_d = {s['w_d']})",
        "",
        "| arm | dark fraction | colour accuracy | no object |",
        "| --- | --- | --- | --- |",
    ]
    for arm, m in results["mean"].items():
        lines.append(
            f"| {arm} | {m['dark_fraction']:.3f} | {m['colour_accuracy']:.3f} | "
            f"{m['no_object_rate']:.3f} |"
        )
    lines += ["", "| prompt | arm | dark | colour | background RGB | cpu s |", "| --- " * 6 + "|"]
    for arm, per_prompt in results["runs"].items():
        for prompt, r in per_prompt.items():
            bg = ", ".join(f"{v:.2f}" for v in r["background"])
            lines.append(
                f"| {prompt} | {arm} | {r['dark_fraction']:.3f} | {r['colour_accuracy']:.3f} | "
                f"{bg} | {r['cpu_seconds']} |"
            )
    lines += ["", f"Timings: {results['timings']}", ""]
    return "\n".join(lines)


def main() -> None:
    print(json.dumps(run(parse_args())["mean"], indent=2))


if __name__ == "__main__":
    main()
