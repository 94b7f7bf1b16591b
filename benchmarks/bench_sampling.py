"""Time per image: InDomainPipeline (w_d > 0, and w_d = 0) vs diffusers' CFG, at equal steps.

    python benchmarks/bench_sampling.py                      # tiny model, CPU
    python benchmarks/bench_sampling.py --device cuda --dtype float16 --geometry sd15

Ideal ratio for w_d > 0 is 1.5x (three UNet evaluations against two); batching the uncond and
prompt predictions into one forward (as diffusers does) and the domain UNet into another can
make it lower. w_d = 0 should be about 1.0x. All configurations are measured in this one run,
interleaved, and reported as medians. Random weights only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from bench_common import (
    build_sd,
    is_cuda,
    native_resolution,
    peak_memory_mb,
    reset_peak_memory,
    timed,
)
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from idgen.models import NullTextUNet
from idgen.models.text import encode_text
from idgen.pipelines import InDomainPipeline

PROMPT = "a photo of a red circle"


def build(args) -> tuple[StableDiffusionPipeline, NullTextUNet]:
    sd = build_sd(args.geometry, args.device)
    with torch.no_grad():
        features = encode_text(sd.tokenizer, sd.text_encoder, [PROMPT], args.device)
    domain = NullTextUNet.from_unet(sd.unet, features, init="value")
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32:
        sd.to(dtype=dtype)
        domain.to(dtype=dtype)
    return sd, domain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--geometry", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sd, domain = build(args)
    scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    cfg_pipe = StableDiffusionPipeline(**{**sd.components, "scheduler": scheduler})
    cfg_pipe.set_progress_bar_config(disable=True)
    ours = InDomainPipeline.from_sd(sd, domain_unet=domain, scheduler=copy.deepcopy(scheduler))
    size = args.resolution or native_resolution(sd)
    common = dict(num_inference_steps=args.steps, height=size, width=size, output_type="latent")
    prompts = [PROMPT] * args.batch

    runs = {
        "diffusers CFG (g=7.5)": lambda g: cfg_pipe(
            prompts, guidance_scale=7.5, generator=g, **common
        ),
        "InDomain w_d=0, w_c=7.5": lambda g: ours(prompts, w_d=0.0, w_c=7.5, generator=g, **common),
        "InDomain w_d=3.5, w_c=3.5": lambda g: ours(
            prompts, w_d=3.5, w_c=3.5, generator=g, **common
        ),
        "InDomain auto weights": lambda g: ours(prompts, generator=g, **common),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    for fn in runs.values():  # warm-up
        fn(torch.Generator().manual_seed(0))
    for r in range(args.repeats):
        for name, fn in runs.items():  # interleaved, so drift hits every configuration alike
            reset_peak_memory(args.device)
            dt = timed(lambda fn=fn, r=r: fn(torch.Generator().manual_seed(r)), args.device)
            times[name].append(dt / args.batch)
            peaks[name] = max(peaks.get(name, 0.0), peak_memory_mb(args.device))

    base = statistics.median(times["diffusers CFG (g=7.5)"])
    print(
        f"device={args.device} dtype={args.dtype} {size}px steps={args.steps} batch={args.batch} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    mem = "peak GPU MiB" if is_cuda(args.device) else "process peak RSS MiB"
    print(f"{'configuration':30s} {'s/image':>9s} {'ratio':>7s} {mem:>22s}")
    for name in runs:
        med = statistics.median(times[name])
        print(f"{name:30s} {med:9.4f} {med / base:6.2f}x {peaks[name]:22.1f}")


if __name__ == "__main__":
    main()
