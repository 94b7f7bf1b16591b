"""One prepared GPU check at SD1.5 scale: sampling, training, the CLIs and the GPU-gated tests.

On the GPU machine (its environment lacks diffusers, hydra-core and omegaconf; the wheels that
`make device-wheels` puts in benchmarks/wheels/ are installed from there when missing):

    python3 benchmarks/device_check.py --out $OUT/device_check.json

Here, on the CPU, the same code with tiny sizes in seconds (the test suite runs this):

    python benchmarks/device_check.py --smoke --out outputs/device_check_smoke.json

Sections, each in its own child process with its own share of a hard overall budget
(``--budget-s``: default 420 s; 2400 s with ``--smoke``, a ceiling for
slow shared CPUs), so a slow or hung section is killed without eating the run;
a section's rows are written as they are measured, so a killed section keeps what it finished:

- ``sampling``: SD1.5-geometry random weights (built from configs, nothing downloaded), 512 px,
  25 DPM-Solver++ steps, fp16 and bf16: ``InDomainPipeline`` (w_d = w_c = 3.5) and with
  w_d = 0 vs diffusers' ``StableDiffusionPipeline`` CFG (g = 7.5) at batch 1 and 8: s/image,
  peak memory, every output finite; then ``enable_model_cpu_offload`` against no offload.
- ``training``: 512 px bf16 autocast, batch 4: null-text vs vanilla (text-conditioned)
  fine-tuning steps/s and peak memory, with and without gradient checkpointing and latent
  cache, fused AdamW, pre-SDPA attention; the largest batch that fits (doubling, then one
  bisection step); a few fp16 steps (with loss scaling) stay finite.
- ``cli``: ``idgen-train`` with ``trainer=gpu`` and with ``trainer=ddp trainer.devices=1`` (tiny
  model, a few steps), then ``idgen-sample trainer=gpu dtype=float16 cpu_offload=true`` with the
  domain model the first run exported.
- ``tests``: ``pytest -m gpu tests/test_gpu.py`` (skipped without CUDA).
- ``memory``: the memory plan against measurement (issue 22): stage-2 (null-text fine-tuning)
  steps at batch 1 through the module, callbacks and Trainer ``idgen-train`` builds, on
  random weights in SD1.5's true layout at 512 px (``memory=default``, ``memory=low``) and
  SDXL's at 1024 px (also ``memory=gpu24``): the plan ``idgen-train plan=true`` prints vs the
  measured peak (``torch.cuda.max_memory_allocated``; peak RSS on the CPU), and steps/s. A case
  the plan says cannot fit the device is skipped with the plan's figure.
- ``sdxl``: SDXL true size at 1024 px in fp16 (issue 21): ``InDomainXLPipeline`` with a
  null-text domain UNet (w_d = w_c = 3.5, and w_d = 0) vs ``StableDiffusionXLPipeline`` CFG
  (g = 7.5): s/image and peak memory; then stage-2 steps/s and peak memory at batch 1 (the
  ``memory`` section's code, ``memory=default``).

The first four sections get their share of the budget; ``memory`` and ``sdxl`` run after them
on what is left (split by their shares), and record a "skipped: budget" row for each case they
cannot finish in it. To measure them on their own: ``--sections memory sdxl --budget-s 300``.

Every figure is printed with a baseline measured in the same run and their ratio, as one table,
and written as JSON. Exit status 0 when every section finished and every check passed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = HERE / "wheels"
# What the GPU machine lacks and the check imports (the wheel folder holds exactly these).
DEVICE_MISSING = ("diffusers", "hydra", "omegaconf", "antlr4")
SECTIONS = ("sampling", "training", "cli", "tests", "memory", "sdxl")
# Share of the overall budget per section (the rest is start-up and the parent's own work).
SHARES = {"sampling": 0.27, "training": 0.30, "cli": 0.22, "tests": 0.21}
# Sections that run after those above, on what they left, split by these shares.
LATER_SHARES = {"memory": 0.55, "sdxl": 0.45}
PROMPT = "a photo of a face"


# ------------------------------------------------------------------------------ dependencies


def install_wheels(wheels: Path, target: Path) -> list[str]:
    """``pip install --no-index --no-deps --target target wheels/*.whl``; returns the wheel names.

    What the device machine does with the carried folder: no registry, no dependency
    resolution (everything else the check needs is already there).
    """
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise FileNotFoundError(
            f"no wheels in {wheels}: run `make device-wheels` on a machine with registry access "
            "and carry that folder to the GPU machine"
        )
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(target), *map(str, files)]
    subprocess.run(cmd, check=True)
    return [f.name for f in files]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def ensure_imports(wheels: Path) -> dict[str, Any]:
    """Make diffusers/hydra/omegaconf and the repository importable, here and in children."""
    paths = [str(REPO)]
    installed: list[str] = []
    missing = [m for m in DEVICE_MISSING if not _importable(m)]
    if missing:
        target = Path(tempfile.gettempdir()) / "idgen-device-site"
        installed = install_wheels(wheels, target)
        paths.insert(0, str(target))
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    importlib.invalidate_caches()
    # Child processes (sections, CLIs, pytest) see the same packages.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([old] if old else [])])
    return {"missing_before": missing, "installed_wheels": installed}


# ------------------------------------------------------------------------------ recording


class Recorder:
    """Appends one JSON row per measurement to a file, flushed, so a killed section keeps them."""

    def __init__(self, path: Path, section: str):
        self.path, self.section = path, section

    def row(
        self,
        name: str,
        value: float | None,
        unit: str,
        baseline: str | None = None,
        base_value: float | None = None,
        ok: bool | None = None,
        note: str = "",
    ) -> None:
        ratio = value / base_value if value is not None and base_value else None
        row = dict(
            section=self.section, name=name, value=value, unit=unit, baseline=baseline,
            base_value=base_value, ratio=ratio, ok=ok, note=note,
        )  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    @staticmethod
    def skipped(section: str) -> dict:
        """The row of a section that did not start: no time was left for it."""
        return dict(
            section=section, name="section", value=None, unit="", baseline=None,
            base_value=None, ratio=None, ok=None, note="skipped: budget",
        )  # fmt: skip


class Budget:
    """A section's deadline: work that cannot finish before it is skipped and said so."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() > seconds


# ------------------------------------------------------------------------------ sections


def sizes(smoke: bool) -> dict[str, Any]:
    """Everything that differs between the GPU run and --smoke: sizes only, never code paths."""
    if smoke:
        return dict(
            geometry="tiny", steps=2, batches=(1, 2), repeats=1, dtypes=("float16", "bfloat16"),
            train_batch=2, train_steps=1, batch_cap=4, fp16_steps=2, cli_steps=2,
        )  # fmt: skip
    return dict(
        geometry="sd15", steps=25, batches=(1, 8), repeats=2, dtypes=("float16", "bfloat16"),
        train_batch=4, train_steps=5, batch_cap=256, fp16_steps=5, cli_steps=4,
    )  # fmt: skip


def section_sampling(rec: Recorder, budget: Budget, device: str, smoke: bool) -> bool:
    import copy

    import torch
    from bench_common import build_sd, native_resolution, peak_memory_mb, reset_peak_memory, timed
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from idgen.models import NullTextUNet
    from idgen.models.text import encode_text
    from idgen.pipelines import InDomainPipeline

    s = sizes(smoke)
    all_ok = True
    for dtype_name in s["dtypes"]:
        if not budget.allows(10):
            rec.row(f"{dtype_name}: skipped", None, "", note="section budget spent")
            all_ok = False
            break
        dtype = getattr(torch, dtype_name)
        short = {"float16": "fp16", "bfloat16": "bf16"}[dtype_name]
        sd = build_sd(s["geometry"], device)
        with torch.no_grad():
            features = encode_text(sd.tokenizer, sd.text_encoder, [PROMPT], device)
        domain = NullTextUNet.from_unet(sd.unet, features).to(dtype=dtype)
        sd.to(dtype=dtype)
        scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
        cfg = StableDiffusionPipeline(**{**sd.components, "scheduler": scheduler})
        cfg.set_progress_bar_config(disable=True)
        ours = InDomainPipeline.from_sd(sd, domain_unet=domain, scheduler=copy.deepcopy(scheduler))
        px = native_resolution(sd)
        common = dict(num_inference_steps=s["steps"], height=px, width=px, output_type="latent")
        runs = _sampling_runs(cfg, ours, common)
        base_name = "diffusers CFG g=7.5"
        for batch in s["batches"]:
            prompts = [PROMPT] * batch
            # One call per configuration at this batch before the timed ones (allocator growth,
            # kernel selection), then repeats interleaved so drift hits all alike.
            est = sum(timed(partial(fn, prompts, 0), device) for fn in runs.values())
            if not budget.allows(est * s["repeats"] + 5):
                rec.row(f"{short} b{batch}: skipped", None, "", note="section budget spent")
                all_ok = False
                continue
            times = {name: [] for name in runs}
            peaks = {name: 0.0 for name in runs}
            finite = {name: True for name in runs}
            for r in range(s["repeats"]):
                for name, fn in runs.items():
                    reset_peak_memory(device)
                    out: list[torch.Tensor] = []
                    dt = timed(partial(_append, out, fn, prompts, r), device)
                    times[name].append(dt / batch)
                    peaks[name] = max(peaks[name], peak_memory_mb(device))
                    latents = out[0]
                    with torch.no_grad():  # the decoded images too: VAE overflow shows here
                        image = sd.vae.decode(latents[:1] / sd.vae.config.scaling_factor).sample
                    finite[name] &= bool(
                        torch.isfinite(latents).all() and torch.isfinite(image).all()
                    )
            med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
            on_gpu = device.startswith("cuda")
            for name in runs:
                tag = f"{short} b{batch} {px}px {s['steps']} steps"
                is_base = name == base_name
                rec.row(
                    f"{tag}: {name}", med[name], "s/image",
                    None if is_base else base_name, None if is_base else med[base_name],
                )  # fmt: skip
                if on_gpu:
                    rec.row(
                        f"{tag}: {name} peak memory", peaks[name], "MiB",
                        None if is_base else base_name, None if is_base else peaks[base_name],
                    )  # fmt: skip
                rec.row(f"{tag}: {name} finite", float(finite[name]), "bool", ok=finite[name])
                all_ok &= finite[name]
        if dtype_name == s["dtypes"][0]:
            all_ok &= _offload(rec, budget, device, ours, common, short)
        cfg = ours = sd = domain = runs = None  # free before the next dtype's models
        reset_peak_memory(device)
    return all_ok


def _sampling_runs(cfg, ours, common: dict) -> dict[str, Callable[[list[str], int], Any]]:
    """The compared samplers as ``fn(prompts, seed) -> output``; the first is the baseline."""
    import torch

    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    return {
        "diffusers CFG g=7.5": lambda p, seed: cfg(
            p, guidance_scale=7.5, generator=gen(seed), **common
        ),
        "ours w_d=w_c=3.5": lambda p, seed: ours(
            p, w_d=3.5, w_c=3.5, generator=gen(seed), **common
        ),
        "ours w_d=0 w_c=7.5": lambda p, seed: ours(
            p, w_d=0.0, w_c=7.5, generator=gen(seed), **common
        ),
    }


def _append(out: list, fn: Callable[[list[str], int], Any], prompts: list[str], seed: int) -> None:
    out.append(fn(prompts, seed).images)


def _offload(rec: Recorder, budget: Budget, device: str, ours, common: dict, short: str) -> bool:
    """``enable_model_cpu_offload`` vs the same pipeline fully on the GPU (batch 1)."""
    import torch
    from bench_common import peak_memory_mb, reset_peak_memory, timed

    name = f"{short} b1 cpu_offload: ours w_d=w_c=3.5"
    if not device.startswith("cuda"):
        rec.row(name, None, "", note="skipped: offload needs an accelerator")
        return True
    if not budget.allows(20):
        rec.row(name, None, "", note="section budget spent")
        return False

    def run():
        return ours(PROMPT, w_d=3.5, w_c=3.5, generator=torch.Generator().manual_seed(0), **common)

    reset_peak_memory(device)
    on_gpu_s = timed(run, device)
    on_gpu_mb = peak_memory_mb(device)
    ours.enable_model_cpu_offload(device=device)
    reset_peak_memory(device)
    out: list[Any] = []
    off_s = timed(lambda: out.append(run().images), device)
    off_mb = peak_memory_mb(device)
    ok = bool(torch.isfinite(out[0]).all())
    rec.row(name, off_s, "s/image", "no offload", on_gpu_s, ok=ok)
    rec.row(f"{name} peak memory", off_mb, "MiB", "no offload", on_gpu_mb)
    return ok


def section_training(rec: Recorder, budget: Budget, device: str, smoke: bool) -> bool:
    from bench_common import peak_memory_mb, reset_peak_memory, timed
    from bench_train import TrainSetup

    s = sizes(smoke)
    geometry, batch = s["geometry"], s["train_batch"]
    # Each option is compared with the same kind without it; null-text with vanilla.
    configs = {
        "vanilla": None,
        "null-text": "vanilla",
        "vanilla+cache": "vanilla",
        "null-text+cache": "null-text",
        "vanilla+gc": "vanilla",
        "null-text+gc": "null-text",
        "null-text+fused": "null-text",
        "null-text+classic": "null-text",
    }
    speed: dict[str, float] = {}
    memory: dict[str, float] = {}
    on_gpu = device.startswith("cuda")
    all_ok = True
    for name, base in configs.items():
        if not budget.allows(15):
            rec.row(f"bf16 b{batch}: {name}", None, "", note="section budget spent")
            all_ok = False
            continue
        reset_peak_memory(device)
        setup = TrainSetup(name, geometry, device, "bf16", batch)
        for _ in range(2):
            setup.step()
        dt = timed(lambda setup=setup: [setup.step() for _ in range(s["train_steps"])], device)
        speed[name] = s["train_steps"] / dt
        memory[name] = peak_memory_mb(device)
        finite = setup.params_finite()
        all_ok &= finite
        tag = f"bf16 b{batch} {setup.resolution}px: {name}"
        rec.row(f"{tag} steps/s", speed[name], "steps/s", base, speed.get(base), ok=finite)
        if on_gpu:
            rec.row(f"{tag} peak memory", memory[name], "MiB", base, memory.get(base))
        del setup
    reset_peak_memory(device)

    # Largest batch that fits: doubling until out of memory (or the cap), then one bisection.
    largest: dict[str, int] = {}
    for name in ("vanilla", "null-text", "null-text+gc"):
        if not budget.allows(30):
            rec.row(f"bf16 largest batch: {name}", None, "", note="section budget spent")
            break
        reset_peak_memory(device)
        setup = TrainSetup(name, geometry, device, "bf16", batch)
        fits, fails, rate, peak = 0, None, 0.0, 0.0
        trial = batch
        while trial <= s["batch_cap"] and budget.allows(20):
            ok, step_s = _try_batch(setup, trial, device)
            if not ok:
                fails = trial
                break
            fits, rate, peak = trial, trial / step_s, peak_memory_mb(device)
            trial *= 2
        if fails is not None and fails - fits > 1 and budget.allows(20):
            mid = (fits + fails) // 2
            ok, step_s = _try_batch(setup, mid, device)
            if ok:
                fits, rate, peak = mid, mid / step_s, peak_memory_mb(device)
        largest[name] = fits
        base = None if name == "vanilla" else "vanilla"
        note = f"first failure at {fails}" if fails else f"cap {s['batch_cap']} reached"
        rec.row(f"bf16 largest batch: {name}", fits, "images", base, largest.get(base), note=note)
        rec.row(f"bf16 batch {fits}: {name} throughput", rate, "images/s")
        if on_gpu:
            rec.row(f"bf16 batch {fits}: {name} peak memory", peak, "MiB")
        del setup
        reset_peak_memory(device)

    # fp16 autocast with loss scaling: a few steps stay finite.
    if budget.allows(15):
        setup = TrainSetup("null-text", geometry, device, "fp16", batch)
        losses = [float(setup.step()) for _ in range(s["fp16_steps"])]
        finite = all(map(lambda x: x == x and abs(x) != float("inf"), losses))
        finite &= setup.params_finite()
        all_ok &= finite
        rec.row(
            f"fp16 b{batch} null-text {len(losses)} steps finite", float(finite), "bool", ok=finite
        )
        del setup
    else:
        rec.row("fp16 steps finite", None, "", note="section budget spent")
        all_ok = False
    return all_ok


def _try_batch(setup, batch: int, device: str) -> tuple[bool, float]:
    """Two steps at ``batch``: (fits, seconds per step of the second)."""
    import torch
    from bench_common import reset_peak_memory, timed

    try:
        setup.set_batch(batch)
        reset_peak_memory(device)
        setup.step()
        return True, timed(setup.step, device)
    except torch.OutOfMemoryError:
        pass
    # Outside the except block: its traceback no longer pins the failed step's activations.
    setup.optimizer.zero_grad(set_to_none=True)
    setup.pixels = setup.latents = None
    reset_peak_memory(device)
    return False, 0.0


def section_cli(rec: Recorder, budget: Budget, device: str, smoke: bool) -> bool:
    """The real CLIs on the tiny model: a few steps with the GPU trainer configs."""
    s = sizes(smoke)
    work = Path(tempfile.mkdtemp(prefix="idgen-device-cli-"))
    gpu = device.startswith("cuda")
    train_common = [
        "experiment=demo", f"paths.root_dir={work}", "data.num_images=16", "data.batch_size=4",
        "inversion_steps=2", f"trainer.max_steps={s['cli_steps']}", "preview.num_inference_steps=2",
        "callbacks.decoupled_sampling.every_n_train_steps=1000", "trainer.log_every_n_steps=1",
    ]  # fmt: skip
    # On the CPU (--smoke) the same runs with the CPU twins of the GPU trainer configs.
    runs = {
        "train_gpu": ["trainer=gpu"] if gpu else ["trainer=cpu"],
        "train_ddp": ["trainer=ddp" if gpu else "trainer=ddp_sim", "trainer.devices=1"],
    }
    all_ok = True
    for run_dir, trainer in runs.items():
        label = "idgen-train " + " ".join(trainer)
        overrides = [*trainer, *train_common]
        all_ok &= _run_cli(rec, budget, label, "idgen.train", work / run_dir, overrides)
    domain = work / "train_gpu" / "domain_model"
    sample = [
        f"domain_model={domain}", f"paths.root_dir={work}", "sampler.num_inference_steps=4",
        "images_per_prompt=2", "batch_size=2", "cpu_offload=true",
        *(["trainer=gpu", "dtype=float16"] if gpu else ["trainer=cpu"]),
    ]  # fmt: skip
    label = "idgen-sample cpu_offload=true " + " ".join(sample[6:])
    ok = _run_cli(rec, budget, label, "idgen.sample", work / "sample", sample)
    if ok:
        pngs = list((work / "sample" / "samples").glob("*.png"))
        ok = len(pngs) == 4
        rec.row("idgen-sample images written", len(pngs), "images", ok=ok)
    all_ok &= ok
    shutil.rmtree(work, ignore_errors=True)
    return all_ok


def _run_cli(rec: Recorder, budget: Budget, label: str, module: str, run_dir: Path, overrides: list[str]) -> bool:  # fmt: skip
    if not budget.allows(10):
        rec.row(label, None, "s", note="section budget spent")
        return False
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", *overrides]
    start = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True,
            timeout=max(budget.left() - 5, 1),
        )  # fmt: skip
        ok, tail = proc.returncode == 0, (proc.stderr or proc.stdout)[-1500:]
    except subprocess.TimeoutExpired:
        ok, tail = False, "timed out"
    rec.row(label, time.time() - start, "s", ok=ok, note="" if ok else tail)
    return ok


def section_tests(rec: Recorder, budget: Budget, device: str, smoke: bool) -> bool:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    cmd += [str(p) for p in sorted((REPO / "tests").glob("test_gpu*.py"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True,
            timeout=max(budget.left() - 2, 1),
        )  # fmt: skip
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}timed out", -1
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
    ok = rc == 0 and counts.get("failed", 0) == 0 and counts.get("error", 0) == 0
    note = "" if ok else out[-1500:]
    rec.row("pytest -m gpu: passed", counts.get("passed", 0), "tests", ok=ok, note=note)
    rec.row("pytest -m gpu: skipped", counts.get("skipped", 0), "tests")
    rec.row("pytest -m gpu", time.time() - start, "s", ok=ok)
    return ok


# ------------------------------------------------------------------ memory plan and SDXL


def memory_sizes(smoke: bool) -> dict[str, Any]:
    """The ``memory`` and ``sdxl`` sections' sizes (like :func:`sizes`: sizes only)."""
    if smoke:
        return dict(
            sd="tiny", xl="tiny_sdxl", presets={"tiny": ("default", "low"),
            "tiny_sdxl": ("default", "low", "gpu24")}, train_steps=3, build_s=10, case_s=10,
            xl_steps=2, xl_repeats=1,
        )  # fmt: skip
    return dict(
        sd="sd15", xl="sdxl", presets={"sd15": ("default", "low"),
        "sdxl": ("default", "low", "gpu24")}, train_steps=6, build_s=60, case_s=40,
        xl_steps=25, xl_repeats=1,
    )  # fmt: skip


def _step_timer(device: str):
    """A Lightning callback timing training steps (device work included): steps/s over every
    step after the first (allocator growth, kernel selection)."""
    import lightning as L
    from bench_common import sync

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args: Any) -> None:
            sync(device)
            self.ends.append(time.perf_counter())

        def steps_per_s(self) -> float | None:
            if len(self.ends) < 2:
                return None
            return (len(self.ends) - 1) / (self.ends[-1] - self.ends[0])

    return StepTimer()


def _base_loader(base) -> Callable[[], Any]:
    """``model_loader`` for the module: the base pipeline as loaded from a folder (float32, host
    memory), built once per family. Each run gets its own VAE (the module casts it, freezes it
    and moves it to the device); the UNet is copied into the null-text UNet, not changed."""
    import copy

    return lambda: type(base).from_pipe(base, vae=copy.deepcopy(base.vae))


def stage2_case(
    rec: Recorder,
    budget: Budget,
    device: str,
    base,
    geometry: str,
    preset: str,
    steps: int,
    work: Path,
    baseline: dict[str, float] | None = None,
) -> dict[str, float] | None:
    """Stage 2 at batch 1 as ``idgen-train stage=finetune memory=<preset>`` runs it (composed
    config, its module, callbacks and Trainer; no validation grids, checkpoints or export),
    with ``base``'s weights. Records the plan vs the measured peak and steps/s; returns
    ``{"peak": bytes, "rate": steps/s, "finite": weights finite}`` or None when skipped. ``baseline``: another preset's
    result, for ratios."""
    import gc

    import torch
    from bench_common import native_resolution, peak_memory_mb, reset_peak_memory
    from hydra.utils import instantiate

    from idgen.memory.check import free_bytes, plans_for
    from idgen.memory.plan import GB
    from idgen.models.layouts import TRUE_SIZE
    from idgen.toyworld.job import compose_run
    from idgen.train import _callbacks, _plugins, prepare_data

    gpu = device.startswith("cuda")
    px = native_resolution(base)
    tag = f"{geometry} {px}px b1 stage 2 memory={preset}"
    run_dir = work / f"{geometry}-{preset}"
    overrides = [
        # the config's family (tiny or tiny_sdxl): the weights are ``base``'s, passed below
        f"model={'tiny_sdxl' if 'sdxl' in geometry else 'tiny'}",
        "stage=finetune", f"memory={preset}", f"trainer={'gpu' if gpu else 'cpu'}",
        f"trainer.max_steps={steps}", f"data.resolution={px}", "data.batch_size=1",
        "data.num_images=4", "data.num_workers=0", f"paths.data_dir={work / 'data'}",
        f"paths.cache_dir={work / 'cache'}", f"paths.log_dir={work / 'logs'}",
        "callbacks.decoupled_sampling=null", "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null", "callbacks.learning_rate_monitor=null",
        "module.export_on_fit_end=false",
    ]  # fmt: skip
    cfg = compose_run("train", run_dir, overrides)
    # the plan `idgen-train plan=true` prints: the family's true size, or the tiny model's
    family = geometry if geometry in TRUE_SIZE else None
    plan = max((p for p, _ in plans_for(cfg, family, fits=False)), key=lambda p: p.peak)
    free, what = free_bytes(plan.shape.accelerator)
    if plan.peak > free:
        rec.row(f"{tag}: plan", plan.peak / GB, "GB", note=f"skipped: {what} {free / GB:.1f} GB")
        return None
    datamodule = prepare_data(cfg, run_dir)
    module = instantiate(cfg.module, model_loader=_base_loader(base))
    module.nonfinite_loss = cfg.get("nonfinite_loss", "stop")
    timer = _step_timer(device)
    trainer = instantiate(
        cfg.trainer, callbacks=[*_callbacks(cfg, stage2=True), timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, **_plugins(cfg),
    )  # fmt: skip
    gc.collect()
    reset_peak_memory(device)
    trainer.fit(module, datamodule=datamodule)
    peak = peak_memory_mb(device) * 2**20
    rate = timer.steps_per_s()
    finite = all(bool(torch.isfinite(p).all()) for p in module.trainable_parameters())
    del trainer, module, datamodule
    gc.collect()
    reset_peak_memory(device)
    ratio = plan.peak / peak
    close = "within" if abs(ratio - 1) <= 0.15 else "outside"
    where = "max_memory_allocated" if gpu else "peak RSS"
    rec.row(
        f"{tag}: plan ({plan.phase})", plan.peak / GB, "GB", f"measured {where}", peak / GB,
        note=f"plan {close} 15 % of the measurement",
    )  # fmt: skip
    base_name = "memory=default"
    rec.row(
        f"{tag}: measured peak", peak / GB, "GB", baseline and base_name,
        baseline and baseline["peak"] / GB,
    )  # fmt: skip
    rec.row(
        f"{tag}: steps/s", rate, "steps/s", baseline and base_name,
        baseline and baseline["rate"], ok=finite,
    )  # fmt: skip
    return {"peak": peak, "rate": rate, "finite": finite}


def section_memory(rec: Recorder, budget: Budget, device: str, smoke: bool) -> bool:
    import torch
    from bench_common import build_sd

    m = memory_sizes(smoke)
    work = Path(tempfile.mkdtemp(prefix="idgen-device-memory-"))
    all_ok = True
    try:
        for geometry in (m["sd"], m["xl"]):
            if not budget.allows(m["build_s"] + m["case_s"]):
                rec.row(f"{geometry} stage 2", None, "", note="skipped: budget")
                continue
            # as idgen-train loads a folder: float32 in host memory (built on the device,
            # where initialising billions of weights is fast, then moved)
            base = build_sd(geometry, device).to("cpu")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            baseline = None
            for preset in m["presets"][geometry]:
                if not budget.allows(m["case_s"]):
                    rec.row(f"{geometry} memory={preset}", None, "", note="skipped: budget")
                    continue
                result = stage2_case(
                    rec, budget, device, base, geometry, preset, m["train_steps"], work, baseline
                )
                baseline = baseline or result
                all_ok &= result is None or result["finite"]
            base = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return all_ok


def section_sdxl(rec: Recorder, budget: Budget, device: str, smoke: bool) -> bool:
    import copy

    import torch
    from bench_common import build_sd, native_resolution, peak_memory_mb, reset_peak_memory, timed
    from diffusers import DPMSolverMultistepScheduler

    from idgen.models import NullTextUNet
    from idgen.models.family import family_of
    from idgen.models.tiny_sdxl import sdxl_pipeline
    from idgen.pipelines import InDomainXLPipeline

    m = memory_sizes(smoke)
    geometry = m["xl"]
    if not budget.allows(m["build_s"]):
        rec.row(f"{geometry} fp16 sampling", None, "", note="skipped: budget")
        return True
    sd = build_sd(geometry, device)
    with torch.no_grad():
        features, pooled = family_of(sd).encode_prompt(sd, [PROMPT])
    domain = NullTextUNet.from_unet(sd.unet, features, pooled_features=pooled)
    domain.to(dtype=torch.float16)
    sd.to(dtype=torch.float16)
    scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    parts = {k: sd.components[k] for k in names}
    cfg = sdxl_pipeline(**parts, scheduler=scheduler)
    ours = InDomainXLPipeline.from_sd(sd, domain_unet=domain, scheduler=copy.deepcopy(scheduler))
    px = native_resolution(sd)
    common = dict(num_inference_steps=m["xl_steps"], height=px, width=px, output_type="latent")
    runs = _sampling_runs(cfg, ours, common)
    base_name = next(iter(runs))
    all_ok = True
    est = sum(timed(partial(fn, [PROMPT], 0), device) for fn in runs.values())  # warm-up
    tag = f"{geometry} fp16 b1 {px}px {m['xl_steps']} steps"
    if budget.allows(est * m["xl_repeats"] + 5):
        times = {name: [] for name in runs}
        peaks = {name: 0.0 for name in runs}
        finite = {name: True for name in runs}
        for r in range(m["xl_repeats"]):
            for name, fn in runs.items():
                reset_peak_memory(device)
                out: list[torch.Tensor] = []
                times[name].append(timed(partial(_append, out, fn, [PROMPT], r), device))
                peaks[name] = max(peaks[name], peak_memory_mb(device))
                finite[name] &= bool(torch.isfinite(out[0]).all())
        for name in runs:
            is_base = name == base_name
            med = sorted(times[name])[len(times[name]) // 2]
            base_med = sorted(times[base_name])[len(times[base_name]) // 2]
            rec.row(
                f"{tag}: {name}", med, "s/image",
                None if is_base else base_name, None if is_base else base_med,
            )  # fmt: skip
            rec.row(
                f"{tag}: {name} peak memory", peaks[name], "MiB",
                None if is_base else base_name, None if is_base else peaks[base_name],
            )  # fmt: skip
            rec.row(f"{tag}: {name} latents finite", float(finite[name]), "bool", ok=finite[name])
            all_ok &= finite[name]
    else:
        rec.row(f"{tag}: timed runs", None, "", note="skipped: budget")
    cfg = ours = domain = runs = None
    # stage 2 on the same weights, as loaded from a folder (float32, host memory)
    base = sd.to("cpu", torch.float32)
    sd = None
    reset_peak_memory(device)
    if not budget.allows(m["case_s"]):
        rec.row(f"{geometry} stage 2 memory=default", None, "", note="skipped: budget")
        return all_ok
    work = Path(tempfile.mkdtemp(prefix="idgen-device-sdxl-"))
    try:
        result = stage2_case(rec, budget, device, base, geometry, "default", m["train_steps"], work)
        all_ok &= result is None or result["finite"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return all_ok


SECTION_FUNCS = {
    "sampling": section_sampling,
    "training": section_training,
    "cli": section_cli,
    "tests": section_tests,
    "memory": section_memory,
    "sdxl": section_sdxl,
}


# ------------------------------------------------------------------------------ parent


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = dict(
        python=platform.python_version(), torch=torch.__version__, device=device,
        cuda=torch.version.cuda, cpu_threads=torch.get_num_threads(),
    )  # fmt: skip
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
        )  # fmt: skip
    for pkg in ("diffusers", "transformers", "lightning", "hydra", "peft"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            env[pkg] = f"unavailable ({type(e).__name__})"
    return env


def run_section(name: str, args: argparse.Namespace, rows_file: Path, seconds: float) -> dict:
    """One section in a child process, killed at ``seconds``; its rows survive a kill."""
    cmd = [sys.executable, __file__, "--section", name, "--rows-file", str(rows_file)]
    cmd += ["--deadline", str(time.time() + seconds - 3), "--device", args.device]
    cmd += ["--smoke"] if args.smoke else []
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds)
        status = {0: "ok", 3: "checks failed"}.get(proc.returncode, f"error rc={proc.returncode}")
        tail = "" if proc.returncode == 0 else (proc.stderr or proc.stdout)[-2000:]
    except subprocess.TimeoutExpired:
        status, tail = "timed out (killed)", ""
    return dict(status=status, seconds=round(time.time() - start, 1), log_tail=tail)


def fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "bool":
        return "yes" if x else "NO"
    return f"{x:.4g} {unit}" if abs(x) < 1e5 else f"{x:.3e} {unit}"


def print_table(env: dict, sections: dict, rows: list[dict]) -> None:
    print()
    print("device check: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    width = max([len(r["name"]) for r in rows] + [20])
    print(
        f"{'section':<9} {'measurement':<{width}} {'value':>16} {'baseline (same run)':>34} {'ratio':>7}"
    )
    for r in rows:
        base = f"{r['baseline']}: {fmt(r['base_value'], r['unit'])}" if r["baseline"] else ""
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        flag = "  FAILED" if r["ok"] is False else ""
        note = (
            f"  ({r['note'].splitlines()[-1][:80]})" if r["note"] and r["ok"] is not False else ""
        )
        print(
            f"{r['section']:<9} {r['name']:<{width}} {fmt(r['value'], r['unit']):>16} "
            f"{base:>34} {ratio:>7}{flag}{note}"
        )
    print(
        "sections: "
        + ", ".join(f"{k} {v['status']} ({v['seconds']} s)" for k, v in sections.items())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    parser.add_argument("--budget-s", type=float, default=None, help="hard overall limit")
    parser.add_argument("--out", default=None, help="JSON results (default outputs/...)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--wheels", default=str(WHEELS), help="wheel folder for missing packages")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.time()
    deps = ensure_imports(Path(args.wheels))
    sys.path.insert(0, str(HERE))  # bench_common, bench_train
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.section:  # child: one section
        rec = Recorder(Path(args.rows_file), args.section)
        try:
            ok = SECTION_FUNCS[args.section](rec, Budget(args.deadline), args.device, args.smoke)
        except Exception:
            traceback.print_exc()
            rec.row("section crashed", None, "", ok=False, note=traceback.format_exc()[-1500:])
            return 1
        return 0 if ok else 3

    if not args.smoke and not args.device.startswith("cuda"):
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    budget = args.budget_s or (2400.0 if args.smoke else 420.0)
    out = Path(args.out or REPO / "outputs" / f"device_check{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **environment(args.device),
        **({"wheels": deps["installed_wheels"]} if deps["installed_wheels"] else {}),
    }
    rows: list[dict] = []
    sections: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="idgen-device-check-"))
    # the first sections in their fixed order, then the later ones on what is left
    order = [n for n in SECTIONS if n in args.sections]
    # (alone, the first sections share the whole budget; with later ones, their fixed shares)
    share_total = 1.0 if any(n in LATER_SHARES for n in order) else sum(SHARES[n] for n in order)
    for i, name in enumerate(order):
        left = budget - (time.time() - started)
        if name in SHARES:
            seconds = min(budget * SHARES[name] / share_total, left)
        else:
            later = sum(LATER_SHARES[n] for n in order[i:])
            seconds = left * LATER_SHARES[name] / later
        if seconds < 5:
            sections[name] = dict(status="skipped: overall budget spent", seconds=0, log_tail="")
            if name in LATER_SHARES:  # by design: they run on what the others left
                sections[name]["status"] = "skipped: budget"
                rows.append(Recorder.skipped(name))
            continue
        rows_file = work / f"{name}.jsonl"
        sections[name] = run_section(name, args, rows_file, seconds)
        if rows_file.exists():
            rows += [json.loads(line) for line in rows_file.read_text().splitlines() if line]
        print(f"[{time.time() - started:6.1f} s] {name}: {sections[name]['status']}", flush=True)
        if sections[name]["log_tail"] and sections[name]["status"] != "ok":
            print(sections[name]["log_tail"], file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    result = dict(env=env, smoke=args.smoke, budget_s=budget, seconds=round(time.time() - started, 1),
                  sections=sections, rows=rows)  # fmt: skip
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False))
    tmp.replace(out)
    print_table(env, sections, rows)
    print(f"wrote {out} in {result['seconds']} s")
    fine = ("ok", "skipped: budget")
    ok = all(v["status"] in fine for v in sections.values()) and all(
        r["ok"] is not False for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
