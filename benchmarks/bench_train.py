"""Training steps/s and peak memory: null-text fine-tuning vs vanilla text-conditioned fine-tuning.

    python benchmarks/bench_train.py                                  # tiny model, CPU
    python benchmarks/bench_train.py --device cuda --precision bf16 --geometry sd15 --batch 4

"vanilla" is what diffusers' train_text_to_image.py does: the frozen text encoder encodes the
captions and the UNet with cross-attention is trained. "null-text" trains the NullTextUNet (no
text encoder pass, no attn2). Options are appended with "+": ``cache`` (latent cache: images
encoded by the VAE once, as ``data.cache_latents=true`` does, so a step skips the VAE),
``gc`` (gradient checkpointing), ``fused`` (``AdamW(fused=True)``), ``classic`` (diffusers'
pre-SDPA ``AttnProcessor`` instead of ``scaled_dot_product_attention``). Every configuration
uses the same batch, resolution and optimizer; timings are interleaved in one process (so load
changes hit all alike) and reported as medians with their ratio to the first configuration.
Peak memory: CUDA ``max_memory_allocated`` per configuration; on CPU (with ``--memory``) the
peak RSS of a fresh child process per configuration. Random weights only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
from bench_common import Geometry, build_sd, is_cuda, native_resolution, peak_memory_mb, timed
from diffusers.models.attention_processor import AttnProcessor

from idgen.models import NullTextUNet
from idgen.models.text import encode_text

PROMPT = "a photo of a face"
OPTIONS = ("cache", "gc", "fused", "classic")
DEFAULT_CONFIGS = (
    "vanilla",
    "null-text",
    "vanilla+cache",
    "null-text+cache",
    "null-text+fused",
    "null-text+classic",
)


@dataclass(frozen=True)
class TrainConfig:
    """One configuration: ``kind`` (vanilla / null-text) and its options."""

    kind: str
    cache: bool = False
    gc: bool = False
    fused: bool = False
    classic: bool = False

    @classmethod
    def parse(cls, name: str) -> TrainConfig:
        kind, *options = name.split("+")
        if kind not in ("vanilla", "null-text"):
            raise ValueError(f"config {name!r}: starts with 'vanilla' or 'null-text'")
        bad = [o for o in options if o not in OPTIONS]
        if bad:
            raise ValueError(f"config {name!r}: unknown options {bad}; known: {list(OPTIONS)}")
        return cls(kind, **{o: True for o in options})


class TrainSetup:
    """One training configuration on one device: models, optimizer, a batch, and ``step()``."""

    def __init__(
        self,
        config: TrainConfig | str,
        geometry: Geometry = "tiny",
        device: str = "cpu",
        precision: str = "fp32",
        batch: int = 8,
        resolution: int | None = None,
    ):
        self.config = TrainConfig.parse(config) if isinstance(config, str) else config
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device)
        self.autocast = precision in ("bf16", "fp16")
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        # fp16 needs loss scaling (Lightning's 16-mixed does the same); bf16 does not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        sd = build_sd(geometry, self.device)
        self.resolution = resolution or native_resolution(sd)
        # Frozen parts in the autocast dtype on GPUs (what vae_dtype=bfloat16 does in training).
        frozen = self.amp_dtype if self.autocast and is_cuda(self.device) else torch.float32
        self.vae = sd.vae.requires_grad_(False).eval()
        if frozen != torch.float32:
            self.vae.to(dtype=frozen)
        self.tokenizer = sd.tokenizer
        c = self.config
        if c.kind == "vanilla":
            self.text_encoder = sd.text_encoder.to(dtype=frozen).requires_grad_(False).eval()
            self.model = sd.unet
        else:
            with torch.no_grad():
                features = encode_text(sd.tokenizer, sd.text_encoder, [PROMPT], self.device)
            self.text_encoder = None
            self.model = NullTextUNet.from_unet(sd.unet, features)
            del sd.unet
        del sd
        if c.classic:
            self.model.set_attn_processor(AttnProcessor())
        if c.gc:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=c.fused or None)
        self.set_batch(batch)

    def set_batch(self, batch: int) -> None:
        """New random images (and their cached latents) of ``batch`` rows; the models stay."""
        self.batch = batch
        g = torch.Generator(self.device).manual_seed(0)
        shape = (batch, 3, self.resolution, self.resolution)
        self.pixels = torch.rand(shape, generator=g, device=self.device) * 2 - 1
        ids = self.tokenizer([PROMPT] * batch, padding="max_length", return_tensors="pt").input_ids
        self.ids = ids.to(self.device)
        self.latents = self.encode() if self.config.cache else None

    @torch.no_grad()
    def encode(self) -> torch.Tensor:
        latents = self.vae.encode(self.pixels.to(self.vae.dtype)).latent_dist.sample()
        return latents.float() * self.vae.config.scaling_factor

    def step(self) -> float:
        """One optimizer step; returns the loss."""
        # 1. Frozen parts: latents (unless cached) and, for vanilla, the caption features.
        latents = self.latents if self.latents is not None else self.encode()
        context = None
        if self.text_encoder is not None:
            with torch.no_grad():
                context = self.text_encoder(self.ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        noisy = latents + noise  # cost, not the exact noise schedule, is what is measured
        # 2. Trained UNet forward/backward and the optimizer step.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            if context is not None:
                pred = self.model(noisy, t, encoder_hidden_states=context).sample
            else:
                pred = self.model(noisy, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def params_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())

    def trained_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _child_peak_rss(name: str, argv: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-child", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--geometry", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: native)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="the first is the baseline"
    )
    parser.add_argument(
        "--memory", action="store_true", help="CPU: peak RSS per config (a child process each)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.configs:
        TrainConfig.parse(name)  # bad names fail before anything is built
    make = lambda name: TrainSetup(  # noqa: E731
        name, args.geometry, args.device, args.precision, args.batch, args.resolution
    )
    if args.memory_child:  # a fresh process: its peak RSS is this configuration's
        setup = make(args.memory_child)
        for _ in range(3):
            setup.step()
        print(json.dumps({"peak_mb": peak_memory_mb(args.device)}))
        return

    setups = {name: make(name) for name in args.configs}
    for setup in setups.values():  # warm-up
        setup.step()
    times: dict[str, list[float]] = {name: [] for name in args.configs}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            dt = timed(lambda s=setup: [s.step() for _ in range(args.steps)], args.device)
            times[name].append(dt / args.steps)
    params = {name: s.trained_params() for name, s in setups.items()}
    memory: dict[str, float | None] = {name: None for name in args.configs}
    if is_cuda(args.device):
        del setups
        for name in args.configs:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            setup = make(name)
            for _ in range(3):
                setup.step()
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated() / 2**20
            del setup
    elif args.memory:
        del setups
        argv = [
            *("--device", args.device, "--precision", args.precision),
            *("--geometry", args.geometry, "--batch", str(args.batch)),
            *(["--resolution", str(args.resolution)] if args.resolution else []),
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        memory = {name: _child_peak_rss(name, argv) for name in args.configs}

    base = args.configs[0]
    med = {name: statistics.median(times[name]) for name in args.configs}
    rows = [
        dict(
            config=name,
            ms_per_step=med[name] * 1e3,
            steps_per_s=1 / med[name],
            speedup=med[base] / med[name],
            peak_mb=memory[name],
            memory_ratio=(memory[name] / memory[base]) if memory[base] else None,
            trained_params=params[name],
        )
        for name in args.configs
    ]
    print(
        f"device={args.device} precision={args.precision} geometry={args.geometry} "
        f"batch={args.batch} steps={args.steps}x{args.rounds} threads={torch.get_num_threads()} "
        f"torch={torch.__version__}"
    )
    mem = "peak GPU MiB" if is_cuda(args.device) else "peak RSS MiB"
    print(
        f"{'config':<20} {'ms/step':>8} {'steps/s':>8} {'speedup':>8} {mem:>13} {'mem':>6} "
        f"{'params':>11}"
    )
    for r in rows:
        peak = f"{r['peak_mb']:13.0f}" if r["peak_mb"] else f"{'-':>13}"
        ratio = f"{r['memory_ratio']:5.2f}x" if r["memory_ratio"] else f"{'-':>6}"
        print(
            f"{r['config']:<20} {r['ms_per_step']:8.1f} {r['steps_per_s']:8.2f} "
            f"{r['speedup']:7.2f}x {peak} {ratio} {r['trained_params']:11,d}"
        )
    print(f"speedup = {base} ms/step / config ms/step (higher is faster); mem = peak / {base}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
