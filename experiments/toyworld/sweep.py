"""w_d x w_c sweep of the toy world (idgen-eval hparams_search=guidance_grid) + the trade-off plot.

    python -m idgen.toyworld.job --out outputs/toyworld            # trains ours + the baseline
    python experiments/toyworld/sweep.py --job outputs/toyworld    # sweeps them, then plots

Hydra multiruns of idgen-eval, each job sampling with idgen-sample and scoring with
metrics=toyworld: ours over a w_d x w_c grid (summary.md + heatmaps of colour accuracy, dark
fraction and tiny FID in <job>/sweep_ours), the vanilla fine-tuning baseline over its CFG
scale w_c (<job>/sweep_finetune) and over its training steps (<job>/finetune_steps/<n>, trained
with idgen-train on the job's data and learning rate). Then tradeoff.py draws text control
(colour accuracy) against domain fidelity (dark fraction): <job>/tradeoff.png and tradeoff.md.

The sweep samples with VALIDATION seeds (``--seed 1000``: image i uses seed 1000 + i), disjoint
from the job's evaluation seeds (0 .. 95), so a setting picked here is not tuned on the numbers
the job reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tradeoff import write_tradeoff

from idgen.toyworld.job import training_overrides
from idgen.toyworld.render import all_captions


def sweep(job: Path, name: str, fields: dict, overrides: list[str], grid: list[str], args) -> Path:
    """One idgen-eval multirun into ``job/sweep_<name>``; skipped when its summary exists.

    ``fields``: idgen-eval's ``sample.<field>`` options (domain_model, baseline_model, sampler);
    ``overrides``: other idgen-sample overrides, verbatim.
    """
    sweep_dir = job / f"sweep_{name}"
    if (sweep_dir / "summary.csv").is_file() and not args.force:
        print(f"{sweep_dir}: done (use --force to redo)")
        return sweep_dir
    if args.force and sweep_dir.is_dir():
        shutil.rmtree(sweep_dir)  # its samples would otherwise be resumed, not redrawn
    prompts = job / "sweep_prompts.txt"
    prompts.write_text("\n".join(all_captions()) + "\n")
    fields = {
        "model": "toyworld",
        "prompt_file": prompts,
        "images_per_prompt": args.images_per_prompt,
        "steps": args.sample_steps,
        "batch_size": 24,
        "seed": args.seed,
        **fields,
    }
    overrides = [
        *overrides,
        "prompts=[]",  # only the captions of the file, not sample.yaml's default prompts
        f"paths.cache_dir={job / 'cache'}",
        "+trainer.enable_progress_bar=false",
    ]
    quoted = ",".join(f"'{o}'" for o in overrides)  # quoted: the values hold '=' and paths
    cmd = [
        sys.executable, "-m", "idgen.evaluate", "hparams_search=guidance_grid", "metrics=toyworld",
        f"hydra.sweep.dir={sweep_dir}", f"reference_dir={job / 'domain'}", "device=cpu", "~logger",
        f"paths.cache_dir={job / 'cache'}", *(f"sample.{k}={v}" for k, v in fields.items()),
        f"sample.overrides=[{quoted}]", *grid,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    print(" ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    return sweep_dir


def job_steps(job: Path) -> int:
    """The baseline's training steps in the job (its results.json, else the experiment's)."""
    results = job / "results.json"
    if results.is_file():
        return int(json.loads(results.read_text())["settings"]["budget"]["finetune"]["steps"])
    return 200


def train_finetune_steps(job: Path, steps: int, args) -> Path:
    """The job's fine-tuning baseline with another step budget (idgen-train, same data and lr)."""
    model = job / "finetune_steps" / str(steps) / "baseline_model"
    if (model / "idgen_baseline.json").is_file():
        return model
    # the job's own training overrides (data, caches, logs, seed), another step budget
    job_args = argparse.Namespace(out=job, steps=steps, lr=None, seed=0)
    cmd = [
        sys.executable, "-m", "idgen.train", *training_overrides(job_args, "toyworld_finetune"),
        f"hydra.run.dir={model.parent}", f"callbacks.model_checkpoint.every_n_train_steps={steps}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    print(" ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=Path("outputs/toyworld"), help="the job's --out")
    p.add_argument("--w-d", default="0.5,1,1.5,2,3", help="ours' w_d values")
    p.add_argument("--w-c", default="2.5,4,6", help="ours' w_c values")
    p.add_argument("--baseline-w-c", default="1.5,2.5,4,6", help="the baseline's CFG scales")
    p.add_argument("--images-per-prompt", type=int, default=4, help="x 12 captions per point")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1000, help="validation seeds (job: 0)")
    p.add_argument(
        "--finetune-steps",
        default="100,200,400",
        help="extra training budgets of the baseline for the trade-off (the job's is added)",
    )
    p.add_argument("--job-w-c", type=float, default=2.5, help="the baseline's CFG scale there")
    p.add_argument("--force", action="store_true", help="redo finished sweeps")
    args = p.parse_args()
    job = args.job.resolve()
    ours, finetuned = job / "ours" / "domain_model", job / "finetune" / "baseline_model"
    for path in (ours, finetuned, job / "domain"):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python -m idgen.toyworld.job --out {job}`.")
    ours_dir = sweep(
        job,
        "ours",
        {"sampler": "decoupled", "domain_model": ours},
        ["sampler.weights=fixed"],
        [f"sample.w_d={args.w_d}", f"sample.w_c={args.w_c}"],
        args,
    )
    finetune_dir = sweep(
        job,
        "finetune",
        {"sampler": "cfg", "baseline_model": finetuned},
        [],
        ["sample.w_d=0", f"sample.w_c={args.baseline_w_c}"],
        args,
    )
    steps_dirs = {}
    for steps in [int(v) for v in args.finetune_steps.split(",") if v]:
        model = train_finetune_steps(job, steps, args)
        steps_dirs[steps] = sweep(
            job,
            f"finetune_steps_{steps}",
            {"sampler": "cfg", "baseline_model": model},
            [],
            ["sample.w_d=0", f"sample.w_c={args.job_w_c}"],
            args,
        )
    written = write_tradeoff(
        {"ours": ours_dir, "fine-tuned": finetune_dir},
        job,
        finetune_steps=steps_dirs,
        job_budget=(job_steps(job), args.job_w_c),
    )
    print(written["markdown"].read_text())


if __name__ == "__main__":
    main()
