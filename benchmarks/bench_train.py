"""Training steps/s and peak memory: null-text fine-tuning vs vanilla text-conditioned fine-tuning.

    python benchmarks/bench_train.py                                  # tiny model, CPU
    python benchmarks/bench_train.py --device cuda --precision bf16 --sd15-geometry --resolution 512

"vanilla" is what diffusers' train_text_to_image.py does: frozen text encoder encodes the
captions, the UNet with cross-attention is trained. "null-text" trains the NullTextUNet (no text
encoder pass, no attn2). Same batch, resolution, optimizer (AdamW) and VAE encoding in both;
timings are interleaved in one process and reported as medians. Peak memory is measured per
configuration in a fresh child process (CUDA: max_memory_allocated; CPU: peak RSS).
Random weights only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from idgen.models import NullTextUNet, build_tiny_sd

PROMPT = "a photo of a face"
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
CONFIGS = ("vanilla", "null-text")


class Setup:
    """One training configuration: its model, optimizer and a step function."""

    def __init__(self, name: str, args: argparse.Namespace):
        torch.manual_seed(0)
        sd = build_tiny_sd(seed=0, cross_attention_dim=768 if args.sd15_geometry else 32)
        if args.sd15_geometry:
            sd.unet = UNet2DConditionModel(**SD15_UNET)
        self.device = torch.device(args.device)
        self.autocast = args.precision in ("bf16", "fp16")
        self.amp_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
        frozen_dtype = self.amp_dtype if self.autocast and args.device != "cpu" else torch.float32
        self.vae = sd.vae.to(self.device, frozen_dtype).requires_grad_(False).eval()
        self.name = name
        ids = sd.tokenizer(
            [PROMPT] * args.batch, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        if name == "vanilla":
            self.text_encoder = sd.text_encoder.to(self.device, frozen_dtype).requires_grad_(False)
            self.ids = ids.to(self.device)
            self.model = sd.unet.to(self.device)
        else:
            with torch.no_grad():
                features = sd.text_encoder(ids[:1])[0]
            self.model = NullTextUNet.from_unet(sd.unet, features).to(self.device)
            del sd.text_encoder
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        size = args.resolution or 64
        self.pixels = torch.rand(args.batch, 3, size, size, device=self.device) * 2 - 1

    def step(self) -> None:
        # 1. Frozen parts: latents (and, for vanilla, the caption features).
        with torch.no_grad():
            latents = self.vae.encode(self.pixels.to(self.vae.dtype)).latent_dist.sample()
            latents = latents.float() * self.vae.config.scaling_factor
            context = self.text_encoder(self.ids)[0] if self.name == "vanilla" else None
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        noisy = latents + noise  # cost, not the exact schedule, is what is measured
        # 2. Trained UNet forward/backward and the optimizer step.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            if self.name == "vanilla":
                pred = self.model(noisy, t, encoder_hidden_states=context).sample
            else:
                pred = self.model(noisy, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def measure_memory(name: str, args: argparse.Namespace) -> dict:
    """Child-process entry: a few steps of one configuration, then its peak memory."""
    setup = Setup(name, args)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        setup.step()
    setup.sync()
    if setup.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in setup.model.parameters())
    return {"peak_mb": peak, "trained_params": params}


def child_memory(name: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-child", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sd15-geometry", action="store_true", help="full-size SD1.5 UNet")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args)))
        return

    argv = [a for a in sys.argv[1:]]
    setups = {name: Setup(name, args) for name in CONFIGS}
    for setup in setups.values():  # warm-up
        setup.step()
        setup.sync()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):  # interleaved rounds: load changes hit both alike
        for name, setup in setups.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                setup.step()
            setup.sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    del setups
    memory = {name: child_memory(name, argv) for name in CONFIGS}

    size = args.resolution or 64
    print(
        f"device={args.device} precision={args.precision} batch={args.batch} {size}px "
        f"sd15_geometry={args.sd15_geometry} gradient_checkpointing={args.gradient_checkpointing}"
    )
    print(f"{'config':<10} {'steps/s':>8} {'ms/step':>8} {'peak MB':>9} {'params':>12}")
    for name in CONFIGS:
        med = statistics.median(times[name])
        mem = memory[name]
        print(
            f"{name:<10} {1 / med:8.2f} {med * 1e3:8.1f} {mem['peak_mb']:9.1f} "
            f"{mem['trained_params']:12,d}"
        )
    speed = statistics.median(times["vanilla"]) / statistics.median(times["null-text"])
    mem_ratio = memory["null-text"]["peak_mb"] / memory["vanilla"]["peak_mb"]
    print(f"null-text / vanilla: {speed:.2f}x steps/s, {mem_ratio:.2f}x peak memory")


if __name__ == "__main__":
    main()
