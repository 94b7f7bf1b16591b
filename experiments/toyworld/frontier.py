"""Beyond the prototype: how close does ours get to dark >= 0.9 AND colour >= 0.8 in the toy world?

    python -m idgen.toyworld.job --out outputs/toyworld          # the domain folder + job models
    python experiments/toyworld/frontier.py --job outputs/toyworld

Trains recipe variants of ours with idgen-train (experiment=toyworld + overrides: EMA on/off,
inverted vs plain-prompt features as the null-text init, longer training, calibrated init),
then samples each with InDomainPipeline over fixed weights, the paper's automatic weights and
the guidance-interval option, and scores 12 captions x --per-caption seeds with the toy-world
metrics. Writes <job>/frontier/frontier.md and frontier.json (every point, the best point with
dark >= 0.9, and each point's distance to the target corner).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from idgen.models import NullTextUNet, load_sd
from idgen.pipelines import InDomainPipeline
from idgen.toyworld import BASE_DIR
from idgen.toyworld.eval_metrics import toy_scores
from idgen.toyworld.job import compose_run, parse_args, training_overrides
from idgen.toyworld.metrics import to_uint8_arrays
from idgen.toyworld.render import all_captions
from idgen.utils.io import atomic_write_text

# name -> idgen-train overrides on top of experiment=toyworld (the job's recipe)
VARIANTS = {
    "job recipe (inverted F^T init, EMA 0.99, 200 steps)": [],
    "no EMA": ["module.ema_decay=null"],
    "plain prompt init (no inversion)": ["stage=finetune", "text_features=null"],
    "calibrated init": ["module.init=calibrated"],
    "800 steps": ["trainer.max_steps=800"],
}
# name -> InDomainPipeline keyword arguments
SETTINGS = {
    **{
        f"fixed w_d={wd} w_c={wc}": {"w_d": wd, "w_c": wc, "weights": "fixed"}
        for wd in (1.0, 1.25, 1.5)
        for wc in (2.5, 3.5)
    },
    **{f"auto w0={w0}": {"w0": w0, "weights": "auto"} for w0 in (3.5, 5.0, 7.0)},
    "fixed 1.5/2.5, domain only in the first 60%": {
        "w_d": 1.5,
        "w_c": 2.5,
        "weights": "fixed",
        "domain_interval": (0.0, 0.6),
    },
    "fixed 1.25/3.5, control only in the first 50%": {
        "w_d": 1.25,
        "w_c": 3.5,
        "weights": "fixed",
        "control_interval": (0.0, 0.5),
    },
}
TARGET = {"dark": 0.9, "colour": 0.8}


def train_variant(job: Path, out: Path, index: int, overrides: list[str]) -> Path:
    from idgen.train import train

    run_dir = out / f"variant_{index}"
    export = run_dir / "domain_model"
    if not (export / "config.json").is_file():
        args = parse_args(["--out", str(job)])
        train(compose_run("train", run_dir, [*training_overrides(args, "toyworld"), *overrides]))
    return export


@torch.no_grad()
def score_setting(pipe: InDomainPipeline, per_caption: int, steps: int, kwargs: dict) -> dict:
    prompts = [c for c in all_captions() for _ in range(per_caption)]
    images = []
    for start in range(0, len(prompts), 24):
        batch = prompts[start : start + 24]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(batch))]
        out = pipe(batch, num_inference_steps=steps, generator=gens, output_type="pt", **kwargs)
        images.append(out.images)
    return toy_scores(to_uint8_arrays(torch.cat(images)), prompts)


def gap(r: dict) -> float:
    """How far a point is from the target corner (0 = both targets met)."""
    return max(0.0, TARGET["dark"] - r["dark_fraction"]) + max(
        0.0, TARGET["colour"] - r["colour_accuracy"]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=Path("outputs/toyworld"))
    p.add_argument("--per-caption", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    job = args.job.resolve()
    out = job / "frontier"
    sd = load_sd(BASE_DIR)
    rows = []
    for index, (variant, overrides) in enumerate(VARIANTS.items()):
        t0 = time.perf_counter()
        domain = NullTextUNet.from_pretrained(train_variant(job, out, index, overrides))
        pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
        for setting, kwargs in SETTINGS.items():
            r = score_setting(pipe, args.per_caption, args.steps, kwargs)
            rows.append({"variant": variant, "setting": setting, **r, "gap": gap(r)})
            print(
                f"{variant:52s} {setting:48s} colour {r['colour_accuracy']:.3f} "
                f"dark {r['dark_fraction']:.3f}",
                flush=True,
            )
        print(f"  ({time.perf_counter() - t0:.0f} s)")
    in_domain = [r for r in rows if r["dark_fraction"] >= TARGET["dark"]]
    best = max(in_domain, key=lambda r: r["colour_accuracy"]) if in_domain else None
    closest = min(rows, key=lambda r: r["gap"])
    md = [
        "# Toy world: ours towards dark >= 0.9 AND colour >= 0.8",
        "",
        f"{args.per_caption} seeds x 12 captions per point, DPM-Solver++ {args.steps} steps.",
        "",
    ]
    for title, r in (("best colour with dark >= 0.9", best), ("closest to the target", closest)):
        if r is not None:
            md.append(
                f"- {title}: **colour {r['colour_accuracy']:.3f}, dark {r['dark_fraction']:.3f}** "
                f"({r['variant']}; {r['setting']})"
            )
    md += [
        "",
        "| variant | sampling | colour acc | dark | no object | gap |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['variant']} | {r['setting']} | {r['colour_accuracy']:.3f} | "
            f"{r['dark_fraction']:.3f} | {r['no_object_rate']:.3f} | {r['gap']:.3f} |"
        )
    atomic_write_text(out / "frontier.md", "\n".join(md) + "\n")
    atomic_write_text(out / "frontier.json", json.dumps(rows, indent=2) + "\n")
    print("\n".join(md[:7]))


if __name__ == "__main__":
    main()
