"""The memory plan against measurement, at true size on this machine's CPU.

    python benchmarks/memory_plan.py --folder /tmp/sd15_true          # builds it when missing
    python benchmarks/memory_plan.py --folder /tmp/sd15_true --cases sd15-s2-low
    python benchmarks/memory_plan.py --folder /tmp/sd15_true --chain  # train -> sample -> eval

Each case is one real ``idgen-train`` run (SD1.5's true layout with random weights, 256 px,
batch 1, 2 steps; stage 2 draws one validation grid of 2 sampling steps at step 2) in its own
process, one at a time. The estimate is the plan that run logs at its start (``expected peak``),
the measurement the process's peak resident memory (``wait4``'s ``ru_maxrss``). Cases whose plan
exceeds the RAM available now are not started; their plan is printed (``plan=true``).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

COMMON = [
    "model=sd15",
    "domain=photos",
    "data=folder",
    "data.resolution=256",
    "data.batch_size=1",
    "data.num_workers=0",
    "preview.enabled=false",
    "preview.control_prompts=[]",
    "logger=csv",
    "inversion_steps=2",
    "trainer.max_steps=2",
    "callbacks.decoupled_sampling.every_n_train_steps=2",
    "callbacks.decoupled_sampling.settings.num_inference_steps=2",
]
CASES = {
    "sd15-s1-default": ["stage=inversion", "memory=default"],
    "sd15-s1-low": ["stage=inversion", "memory=low"],
    "sd15-s2-default": ["stage=finetune", "memory=default"],
    "sd15-s2-low": ["stage=finetune", "memory=low"],
}
PEAK = re.compile(r"expected peak\s+([\d.]+) GB \(([^)]*)\)")


def build_folder(folder: Path) -> None:
    """SD1.5's true layout with random weights, saved as a diffusers folder (~4.3 GB)."""
    from bench_common import build_sd

    pipe = build_sd("sd15")
    pipe.save_pretrained(folder, safe_serialization=True)


def make_images(root: Path, n: int = 4) -> None:
    """A few real photographs (scikit-image ships them) at 256 px."""
    from PIL import Image
    from skimage import data

    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")[:n]):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((256, 256)).save(
            root / f"{i}.png"
        )


def run_case(name: str, folder: Path, images: Path, out: Path, plan_only: bool) -> dict:
    args = [
        sys.executable,
        "-m",
        "idgen.train",
        *COMMON,
        f"model.pretrained={folder}",
        f"data.root={images}",
        f"hydra.run.dir={out / name}",
        *CASES[name],
    ]
    if plan_only:
        args.append("plan=true")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # resident memory every 0.2 s next to the output lines: which step of the run set the peak
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        import psutil

        child = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                samples.append((time.perf_counter(), child.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    lines = [(time.perf_counter(), line) for line in proc.stdout]
    text = "".join(line for _, line in lines)
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    if os.environ.get("MEMORY_PLAN_TIMELINE"):  # the resident-memory timeline, for digging
        with open(os.environ["MEMORY_PLAN_TIMELINE"], "w") as f:
            json.dump({"rss": samples, "lines": lines}, f)
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else start
    before = [line.strip() for t, line in lines if t <= peak_at and line.strip()]
    during = before[-1][:100] if before else ""
    seconds = time.perf_counter() - start
    peaks = [(float(gb), phase) for gb, phase in PEAK.findall(text)]
    # stage 2 runs log the stage-2 plan only; the last planned peak is the run's own stage
    estimate, phase = peaks[-1] if peaks else (float("nan"), "")
    measured = usage.ru_maxrss * 1024 / 1e9
    ok = os.waitstatus_to_exitcode(status) == 0
    if not ok:
        print(text[-3000:], file=sys.stderr)
    return {
        "case": name,
        "estimate_gb": estimate,
        "phase": phase,
        "measured_gb": None if plan_only else measured,
        "ratio": None if plan_only or not ok else estimate / measured,
        "seconds": round(seconds, 1),
        "peak_after": during,
        "ok": ok,
    }


def run_chain(folder: Path, images: Path, out: Path) -> None:
    """idgen-train (stage 2, memory=low) -> idgen-sample -> idgen-eval at true size, each in its
    own process; prints each process's peak resident memory."""
    run = out / "chain_train"
    steps = [
        (
            "idgen-train memory=low",
            [
                "idgen.train",
                *COMMON,
                f"model.pretrained={folder}",
                f"data.root={images}",
                f"hydra.run.dir={run}",
                "stage=finetune",
                "memory=low",
            ],
        ),
        (
            "idgen-sample",
            [
                "idgen.sample",
                "model=sd15",
                f"model.pretrained={folder}",
                f"domain_model={run / 'domain_model'}",
                "prompts=[a photo of photos]",
                "images_per_prompt=2",
                "batch_size=1",
                "resolution=256",
                "sampler.num_inference_steps=4",
                f"hydra.run.dir={out / 'chain_sample'}",
            ],
        ),
        (
            "idgen-eval",
            [
                "idgen.evaluate",
                f"samples_dir={out / 'chain_sample'}",
                f"reference_dir={images}",
                "resolution=256",
                f"hydra.run.dir={out / 'chain_eval'}",
            ],
        ),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for name, args in steps:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        text = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        ok = os.waitstatus_to_exitcode(status) == 0
        if not ok:
            print(text[-3000:], file=sys.stderr)
        print(
            f"{name:24} peak RSS {usage.ru_maxrss * 1024 / 1e9:6.2f} GB  "
            f"[{time.perf_counter() - start:.0f} s]{'' if ok else '  (FAILED)'}",
            flush=True,
        )
        if not ok:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="SD1.5 true-size folder")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--plan-only", action="store_true", help="plans only (seconds each)")
    parser.add_argument("--json", type=Path, help="append each result as a JSON line here")
    parser.add_argument(
        "--chain", action="store_true", help="train (memory=low) -> sample -> eval instead"
    )
    args = parser.parse_args()
    if not (args.folder / "model_index.json").is_file():
        print(f"building SD1.5's true layout (random weights) in {args.folder} ...", flush=True)
        build_folder(args.folder)
    work = Path(tempfile.mkdtemp(prefix="memory_plan_"))
    try:  # each stage-2 run leaves a 5 GB checkpoint and a 3 GB export: removed at the end
        run_cases(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_cases(args: argparse.Namespace, work: Path) -> None:
    make_images(work / "images")
    if args.chain:
        run_chain(args.folder, work / "images", work)
        return
    print(f"{'case':18} {'estimate GB':>12} {'measured GB':>12} {'est/meas':>9}  phase")
    for name in args.cases:
        row = run_case(name, args.folder, work / "images", work / "runs", args.plan_only)
        measured = "-" if row["measured_gb"] is None else f"{row['measured_gb']:.2f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(
            f"{name:18} {row['estimate_gb']:12.2f} {measured:>12} {ratio:>9}  {row['phase']}"
            f"{'' if row['ok'] else '  (FAILED)'}  [{row['seconds']} s; peak after: "
            f"{row['peak_after']!r}]",
            flush=True,
        )
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
