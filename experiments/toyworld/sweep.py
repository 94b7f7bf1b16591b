"""w_d x w_c sweep of the toy world (idgen-eval hparams_search=guidance_grid) + the trade-off plot.

    python -m idgen.toyworld.job --out outputs/toyworld            # trains ours + the baseline
    python experiments/toyworld/sweep.py --job outputs/toyworld    # sweeps them, then plots

Two Hydra multiruns of idgen-eval, each job sampling with idgen-sample and scoring with
metrics=toyworld: ours over a w_d x w_c grid (summary.md + heatmaps of colour accuracy, dark
fraction and tiny FID in <job>/sweep_ours), and the vanilla fine-tuning baseline over its CFG
scale w_c (<job>/sweep_finetune). Then tradeoff.py draws text control (colour accuracy) against
domain fidelity (dark fraction) for both: <job>/tradeoff.png and tradeoff.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tradeoff import write_tradeoff

from idgen.toyworld.render import all_captions


def sweep(job: Path, name: str, sample_overrides: list[str], grid: list[str], args) -> Path:
    """One idgen-eval multirun into ``job/sweep_<name>``; skipped when its summary exists."""
    sweep_dir = job / f"sweep_{name}"
    if (sweep_dir / "summary.csv").is_file() and not args.force:
        print(f"{sweep_dir}: done (use --force to redo)")
        return sweep_dir
    if args.force and sweep_dir.is_dir():
        shutil.rmtree(sweep_dir)  # its samples would otherwise be resumed, not redrawn
    prompts = job / "sweep_prompts.txt"
    prompts.write_text("\n".join(all_captions()) + "\n")
    common = [
        "model=toyworld",
        "prompts=[]",  # only the captions of the file (sample.yaml has default prompts)
        f"prompt_file={prompts}",
        f"images_per_prompt={args.images_per_prompt}",
        f"sampler.num_inference_steps={args.sample_steps}",
        "batch_size=24",
        f"paths.cache_dir={job / 'cache'}",
        "+trainer.enable_progress_bar=false",
    ]
    # quoted: the values hold '=' and paths
    overrides = ",".join(f"'{o}'" for o in common + sample_overrides)
    cmd = [
        sys.executable, "-m", "idgen.evaluate", "hparams_search=guidance_grid", "metrics=toyworld",
        f"hydra.sweep.dir={sweep_dir}", f"reference_dir={job / 'domain'}", "device=cpu", "~logger",
        f"paths.cache_dir={job / 'cache'}", f"sample.overrides=[{overrides}]", *grid,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    print(" ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    return sweep_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=Path("outputs/toyworld"), help="the job's --out")
    p.add_argument("--w-d", default="0,0.5,0.75,1,1.25,1.5,2", help="ours' w_d values")
    p.add_argument("--w-c", default="1.5,2.5,3.5", help="w_c values (ours and the baseline)")
    p.add_argument("--baseline-w-c", default="1,1.5,2.5,3.5,5", help="the baseline's CFG scales")
    p.add_argument("--images-per-prompt", type=int, default=4, help="x 12 captions per point")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
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
        ["sampler=decoupled", "sampler.weights=fixed", f"domain_model={ours}"],
        [f"sample.w_d={args.w_d}", f"sample.w_c={args.w_c}"],
        args,
    )
    finetune_dir = sweep(
        job,
        "finetune",
        ["sampler=cfg", f"baseline_model={finetuned}"],
        ["sample.w_d=0", f"sample.w_c={args.baseline_w_c}"],
        args,
    )
    written = write_tradeoff({"ours": ours_dir, "fine-tuned": finetune_dir}, job)
    print(written["markdown"].read_text())


if __name__ == "__main__":
    main()
