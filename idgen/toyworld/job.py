"""The toy world end to end: the README's main job, through idgen-train/-sample/-eval's own code.

    python -m idgen.toyworld.job [--out outputs/toyworld] [--steps 400] [--threads 1]
    python -m idgen.toyworld.job --family sdxl    # the same on the SDXL toy base (sd3: SD3's)

Into one folder: the domain images (dark backgrounds, unlabeled), ours (text-feature inversion
then null-text fine-tuning, ``experiment=toyworld``), the vanilla fine-tuning baseline on the
same budget (``experiment=toyworld_finetune``), samples of the base, the baseline and ours on
the same colour prompts and seeds (``idgen-sample``), their metrics (``idgen-eval
metrics=toyworld``), ``comparison.png`` (rows: base, fine-tuned, ours; columns: prompts) and
``results.md`` / ``results.json``. ``--family`` picks the toy base (``model=toyworld``,
``toyworld_sdxl``, ``toyworld_sd3``: the same open world pretrained in each family's layout,
``idgen.toyworld.bases``); the commands are otherwise the same. A rerun skips finished stages: trained models are kept,
finished images are not redrawn. Each stage is the CLI's function called in this process on
the config the CLI would compose (``train``, ``sample``, ``evaluate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from idgen import CONFIG_DIR
from idgen.toyworld.figure import comparison_figure
from idgen.toyworld.render import all_captions
from idgen.toyworld.report import ROWS, results_markdown
from idgen.utils.io import atomic_write_text
from idgen.utils.timing import StageTimer

log = logging.getLogger("idgen.toyworld.job")


def compose_run(config_name: str, run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The config ``idgen-<config_name> <overrides> hydra.run.dir=<run_dir>`` would run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.work_dir = os.getcwd()
        del cfg["hydra"]  # @hydra.main hands the job its config without Hydra's own node
    return cfg


#: the toy base of each model family (``idgen/conf/model/``)
TOY_MODELS = {"sd15": "toyworld", "sdxl": "toyworld_sdxl", "sd3": "toyworld_sd3"}


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The family's toy base (``--family``), or the folder ``--base`` names instead."""
    overrides = [f"model={TOY_MODELS[args.family]}"]
    if args.base is not None:
        overrides.append(f"model.pretrained={Path(args.base).resolve()}")
    return overrides


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Where data, caches and logs go: all under ``args.out``."""
    out = args.out.resolve()
    return [
        f"paths.data_dir={out}",
        f"paths.cache_dir={out / 'cache'}",
        f"paths.log_dir={out}",
        f"seed={args.seed}",
    ]


def training_overrides(args: argparse.Namespace, experiment: str) -> list[str]:
    """``experiment``'s budget unless --steps / --lr say otherwise (the same for both methods)."""
    out = args.out.resolve()
    overrides = [
        f"experiment={experiment}",
        *model_overrides(args),
        *common_overrides(args),
        f"data.root={out / 'domain'}",
        "callbacks.progress_bar.refresh_rate=0",
    ]
    if args.steps is not None:
        overrides.append(f"trainer.max_steps={args.steps}")
    if args.lr is not None:
        overrides.append(f"module.optimizer.lr={args.lr}")
    return overrides


def budget(cfg: DictConfig) -> dict:
    """What decides a training run's cost and strength (recorded in results.json)."""
    return {
        "steps": int(cfg.trainer.max_steps),
        "lr": float(cfg.module.optimizer.lr),
        "batch_size": int(cfg.data.batch_size),
        "num_images": int(cfg.data.num_images),
        "inversion_steps": int(cfg.inversion_steps) if cfg.stage == "all" else 0,
    }


def train_ours(args: argparse.Namespace) -> tuple[Path, dict]:
    """Stage 1 + 2 (``idgen-train experiment=toyworld``): the exported domain model, its budget."""
    from idgen.train import train

    run_dir = args.out.resolve() / "ours"
    export = run_dir / "domain_model"
    overrides = training_overrides(args, "toyworld")
    if args.inversion_steps is not None:
        overrides.append(f"inversion_steps={args.inversion_steps}")
    cfg = compose_run("train", run_dir, overrides)
    if (export / "config.json").is_file():
        log.info("ours: %s exists, training skipped", export)
    else:
        train(cfg)
    return export, budget(cfg)


def train_finetune(args: argparse.Namespace) -> tuple[Path, dict]:
    """The vanilla fine-tuning baseline (``idgen-train experiment=toyworld_finetune``)."""
    from idgen.train import train

    run_dir = args.out.resolve() / "finetune"
    export = run_dir / "baseline_model"
    cfg = compose_run("train", run_dir, training_overrides(args, "toyworld_finetune"))
    if (export / "idgen_baseline.json").is_file():
        log.info("fine-tuning baseline: %s exists, training skipped", export)
    else:
        train(cfg)
    return export, budget(cfg)


def sample_row(args: argparse.Namespace, row: str, ours: Path, finetuned: Path) -> Path:
    """``idgen-sample`` for one figure row; returns the folder of its images."""
    from idgen.sample import sample

    run_dir = args.out.resolve() / "samples" / row
    model = {
        "base": ["sampler=cfg", f"sampler.w_c={args.w_c}"],
        "finetune": [
            f"baseline_model={finetuned}",
            "sampler=cfg",
            f"sampler.w_c={args.w_c}",
        ],
        "ours": [
            "sampler=decoupled",
            f"domain_model={ours}",
            "sampler.weights=fixed",
            f"sampler.w_d={args.w_d}",
            f"sampler.w_c={args.w_c}",
        ],
        # the paper's automatic initial weights: w0/2 * |eps_sd| / |eps_i| at the first step
        "ours_auto": [
            "sampler=decoupled",
            f"domain_model={ours}",
            "sampler.weights=auto",
            f"sampler.w0={args.w0}",
        ],
    }[row]
    prompts = ",".join(f"'{p}'" for p in args.prompts)
    overrides = [
        *model_overrides(args),
        *model,
        *common_overrides(args),
        f"sampler.num_inference_steps={args.sample_steps}",
        f"prompts=[{prompts}]",
        f"images_per_prompt={args.images_per_prompt}",
        f"batch_size={args.batch_size}",
        "+trainer.enable_progress_bar=false",
    ]
    summary = sample(compose_run("sample", run_dir, overrides))
    return Path(summary["images_dir"])


def evaluate_row(args: argparse.Namespace, row: str, samples_dir: Path) -> dict:
    """``idgen-eval metrics=toyworld`` of one row's samples against the domain images."""
    from idgen.evaluate import evaluate

    out = args.out.resolve()
    overrides = [
        "metrics=toyworld",
        *common_overrides(args),
        f"samples_dir={samples_dir}",
        f"reference_dir={out / 'domain'}",
        "device=cpu",
        "~logger",
    ]
    return evaluate(compose_run("eval", out / "eval" / row, overrides))


def prepare_domain(args: argparse.Namespace) -> Path:
    """Render the domain folder once, before the two trainings may run side by side."""
    from idgen.toyworld.demo import make_demo_domain

    cfg = compose_run("train", args.out.resolve() / "ours", training_overrides(args, "toyworld"))
    data = cfg.data
    return make_demo_domain(data.root, data.num_images, data.resolution, data.generate_seed)


def _train_in_worker(method: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """One training in a worker process (spawned: it sets up logging and threads itself)."""
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][{method}] %(message)s")
    torch.set_num_threads(args.threads)
    return {"ours": train_ours, "finetune": train_finetune}[method](args)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--family",
        choices=sorted(TOY_MODELS),
        default="sd15",
        help="the toy base's model family (default sd15)",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a toy base folder of that family (default: shipped)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (outputs/toyworld[_<family>])"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of ours' stage 2 and of the baseline (default: the experiments')",
    )
    p.add_argument("--inversion-steps", type=int, default=None, help="ours' stage 1 steps")
    p.add_argument("--lr", type=float, default=None, help="learning rate of both (same budget)")
    # w_d 2, w_c 2.5: picked on validation seeds (experiments/toyworld/sweep.py, seed 1000), never
    # on the job's evaluation seeds (0 .. 95)
    p.add_argument("--w-d", type=float, default=2.0, help="domain guidance weight of ours")
    p.add_argument("--w-c", type=float, default=2.5, help="text guidance weight (every row)")
    p.add_argument("--w0", type=float, default=7.0, help="ours' automatic weights (paper: 7)")
    p.add_argument("--sample-steps", type=int, default=25, help="DPM-Solver++ steps")
    p.add_argument("--images-per-prompt", type=int, default=8)
    p.add_argument("--prompts", nargs="+", default=all_captions(), help="default: all 12 captions")
    p.add_argument("--batch-size", type=int, default=24, help="images per sampling call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see README)")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="train ours and the baseline side by side in 2 processes (1: one after the other)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if args.family == "sd15" else f"_{args.family}"
        args.out = Path(f"outputs/toyworld{suffix}")
    return args


def _train_side_by_side(args: argparse.Namespace):
    """Ours and the fine-tuning baseline in two processes (each trains on one thread)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        ours = pool.submit(_train_in_worker, "ours", args)
        finetuned = pool.submit(_train_in_worker, "finetune", args)
        return ours.result(), finetuned.result()


def run(args: argparse.Namespace) -> dict:
    """Every stage in order; returns what results.json holds."""
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), os.getloadavg()
    timer = StageTimer()

    # 1-3. the domain folder, then ours (inversion + null-text fine-tuning) and the baseline:
    # side by side in two processes when two CPUs are there
    prepare_domain(args)
    if args.jobs > 1:
        both = "train ours + fine-tuning baseline (2 processes)"
        (ours, ours_budget), (finetuned, finetune_budget) = timer.run(
            both, _train_side_by_side, args
        )
    else:
        ours, ours_budget = timer.run("train ours", train_ours, args)
        finetuned, finetune_budget = timer.run("train fine-tuning baseline", train_finetune, args)
    # 4-5. the same prompts and seeds for every row, then the metrics of each row
    samples, metrics = {}, {}
    for row in ROWS:
        samples[row] = timer.run(f"sample {row}", sample_row, args, row, ours, finetuned)
        metrics[row] = timer.run(f"evaluate {row}", evaluate_row, args, row, samples[row])
    # 6. figure and table
    figure = comparison_figure(
        samples, args.prompts, args.images_per_prompt, out / "comparison.png"
    )
    timings = {**timer.seconds, "total": round(time.perf_counter() - start, 1)}
    results = {
        "rows": {row: _row_summary(metrics[row]) for row in ROWS},
        "settings": {
            "family": args.family,
            "base": str(args.base) if args.base is not None else TOY_MODELS[args.family],
            "budget": {"ours": ours_budget, "finetune": finetune_budget},
            "w_d": args.w_d,
            "w_c": args.w_c,
            "w0": args.w0,
            "sample_steps": args.sample_steps,
            "images_per_prompt": args.images_per_prompt,
            "prompts": list(args.prompts),
            "seed": args.seed,
            "threads": args.threads,
            "jobs": args.jobs,
        },
        "timings_s": timings,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "figure": str(figure),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    return results


def _row_summary(m: dict) -> dict:
    keys = (
        "colour_accuracy",
        "shape_accuracy",
        "no_object_rate",
        "dark_fraction",
        "fid",
        "kid_mean",
        "num_samples",
        "num_reference",
        "feature_extractor",
    )
    return {k: m[k] for k in keys if k in m}


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    results = run(parse_args(argv))
    print(results_markdown(results))


if __name__ == "__main__":
    main()
