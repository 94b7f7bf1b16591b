"""Why the toy base uses 32px images with a factor-4 VAE: VAE training-step cost per option.

Times one AdamW step (encode, sample, decode, L1+MSE+KL) of each candidate VAE at batch 32 on
rendered toy images and prints it as a ratio to the chosen one, all measured in this run.

    python experiments/toyworld/bench_vae_factor.py [--threads 1] [--iters 8]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from idgen.toyworld.bases import build_vae
from idgen.toyworld.pretrain import mixed_world_batch

CANDIDATES = {
    "32px factor 4 (chosen, 8x8 latent)": (32, None),
    "32px factor 8 (4x4 latent)": (32, (16, 16, 32, 32)),
    "64px factor 8 (8x8 latent, tiny-preset VAE)": (64, (16, 16, 32, 32)),
}


def make_vae(channels, resolution):
    if channels is None:
        return build_vae()
    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=resolution,
    )


def step_seconds(vae: AutoencoderKL, x: torch.Tensor, iters: int) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)

    def step():
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name, (resolution, channels) in CANDIDATES.items():
        x = mixed_world_batch(32, seed=0)
        if resolution != 32:
            x = F.interpolate(x, size=resolution, mode="bilinear", align_corners=False)
        results[name] = step_seconds(make_vae(channels, resolution), x, args.iters)
    base = results[next(iter(CANDIDATES))]
    for name, seconds in results.items():
        print(f"{name:46s} {seconds * 1e3:7.1f} ms/step  x{seconds / base:.2f}")


if __name__ == "__main__":
    main()
