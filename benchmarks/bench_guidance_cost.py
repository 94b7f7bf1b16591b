"""Decoupled sampling near the cost of CFG: quality vs time per image on the toy world.

    python -m idgen.toyworld.job --out outputs/toyworld          # the domain model
    python benchmarks/bench_guidance_cost.py --domain-model outputs/toyworld/ours/domain_model

The paper's sampler runs three UNet evaluations per step (frozen SD with "" and with the prompt,
batched into one call as diffusers does for CFG, plus the domain UNet) against CFG's two. Options
that cut the domain UNet's share, all in ``InDomainPipeline``:

- ``domain_interval=(0, e)`` (``sampler.domain_interval``): the domain term only in the first
  ``e`` of the schedule;
- ``domain_reuse_every=k`` (``sampler.domain_reuse_every``): predict the domain term every
  ``k``-th step and reuse its direction ``eps_d - eps_sd(z, "")`` in between.

Every option samples the same 12 colour x shape captions with the same seeds (validation seeds,
2000 + i) on the shipped toy base, and is scored by ``idgen.toyworld.metrics`` (colour accuracy,
dark fraction, each with its binomial standard error) and the tiny-extractor FID against rendered
domain images (NOT Inception FID). Time per image: the minimum over ``--repeats`` interleaved
rounds, reported as a ratio against CFG (``w_d = 0``) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from idgen.guidance import GuidanceTerm, decoupled_terms
from idgen.metrics import TinyFeatureExtractor
from idgen.metrics.fid import fid_from_features
from idgen.models import NullTextUNet, load_sd
from idgen.pipelines import InDomainPipeline
from idgen.toyworld import BASE_DIR, all_captions, render_world, score
from idgen.toyworld.metrics import to_uint8_arrays


def options(w_d: float, w_c: float) -> dict[str, list[GuidanceTerm]]:
    """Name -> the guidance terms of one option (``decoupled_terms``' arguments); the first,
    CFG (no domain term), is the cost baseline."""
    return {
        "cfg (w_d = 0)": decoupled_terms(0.0, w_c),
        "decoupled, full": decoupled_terms(w_d, w_c),
        "domain in first 50%": decoupled_terms(w_d, w_c, domain_interval=(0.0, 0.5)),
        "domain in first 70%": decoupled_terms(w_d, w_c, domain_interval=(0.0, 0.7)),
        "domain reuse k=2": decoupled_terms(w_d, w_c, domain_reuse_every=2),
        "domain reuse k=3": decoupled_terms(w_d, w_c, domain_reuse_every=3),
        "domain reuse k=2, first 70%": decoupled_terms(
            w_d, w_c, domain_interval=(0.0, 0.7), domain_reuse_every=2
        ),
    }


def features(extractor: TinyFeatureExtractor, images: list[np.ndarray]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # uint8 [B,3,H,W]
    with torch.no_grad():
        return extractor(batch)


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain-model", type=Path, required=True, help="exported domain_model/")
    p.add_argument("--base", type=Path, default=BASE_DIR, help="the toy base (default: shipped)")
    p.add_argument("--w-d", type=float, default=2.0)
    p.add_argument("--w-c", type=float, default=2.5)
    p.add_argument("--per-caption", type=int, default=8, help="x 12 captions (>= 8: 96 samples)")
    p.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds (minimum is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    sd = load_sd(args.base)
    domain = NullTextUNet.from_pretrained(args.domain_model)
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    captions = all_captions()
    prompts = [c for c in captions for _ in range(args.per_caption)]
    targets = [c.split()[1] for c in prompts]
    extractor = TinyFeatureExtractor(input_size=32)
    reference = features(extractor, to_uint8_arrays(render_world("domain", 1024, 32, seed=7)[0]))

    def sample(terms: list[GuidanceTerm]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        return pipe(
            prompts,
            weights="fixed",
            num_inference_steps=args.steps,
            generator=generators,
            output_type="pt",
            guidance=terms,
        ).images

    rows: dict[str, dict] = {}
    opts = options(args.w_d, args.w_c)
    sample(opts["cfg (w_d = 0)"])  # warm-up: allocator, kernels, lazy imports
    for round_ in range(args.repeats):
        for name, terms in opts.items():  # interleaved: load drifts hit every option alike
            start = time.perf_counter()
            images = sample(terms)
            seconds = (time.perf_counter() - start) / len(prompts)
            row = rows.setdefault(name, {"s_per_image": seconds})
            row["s_per_image"] = min(row["s_per_image"], seconds)
            if round_ == 0:
                arrays = to_uint8_arrays(images)
                m = score(arrays, targets)
                row.update(
                    colour=m["colour_accuracy"],
                    colour_se=stderr(m["colour_accuracy"], len(arrays)),
                    dark=m["dark_fraction"],
                    dark_se=stderr(m["dark_fraction"], len(arrays)),
                    fid_tiny=fid_from_features(reference, features(extractor, arrays)),
                    n=len(arrays),
                )
    cfg = rows["cfg (w_d = 0)"]["s_per_image"]
    print(
        f"\ntoy world, {len(prompts)} samples per option, DPM-Solver++ {args.steps} steps, "
        f"w_d {args.w_d}, w_c {args.w_c}, {args.threads} thread(s), min of {args.repeats} rounds\n"
    )
    print("| option | s/image | vs CFG | colour acc | dark fraction | FID (tiny) |")
    print("|---|---:|---:|---|---|---:|")
    for name, r in rows.items():
        r["ratio_vs_cfg"] = r["s_per_image"] / cfg
        print(
            f"| {name} | {r['s_per_image']:.4f} | {r['ratio_vs_cfg']:.2f}x | "
            f"{r['colour']:.3f} ± {r['colour_se']:.3f} | {r['dark']:.3f} ± {r['dark_se']:.3f} | "
            f"{r['fid_tiny']:.3f} |"
        )
    result = {"settings": vars(args) | {"domain_model": str(args.domain_model)}, "rows": rows}
    result["settings"]["base"] = str(args.base)
    result["settings"].pop("out", None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
