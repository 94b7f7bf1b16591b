"""Pretraining recipe of the toy base: a text-to-image model of the open world.

The base is a diffusers folder in SD1.5 layout that ``idgen.models.load_sd`` loads:

- images are 32x32; the VAE (``AutoencoderKL``, 3 levels, factor 4, 4 latent channels) is
  trained first on BOTH worlds (light open-world and dark domain images), because idgen later
  encodes domain images with it. Its ``scaling_factor`` is set to 1 / std of the latents.
- the UNet (``UNet2DConditionModel``, the tiny preset's geometry on 8x8 latents) is then
  trained text-to-image on open-world images only (every background, dark ones rare),
  captions like "a red circle" that never name the background, with 10% caption dropout to
  "" so classifier-free guidance works;
- the text encoder and tokenizer are ``build_tiny_sd(seed)``'s: a random, frozen 2-layer CLIP
  text model over a tokenizer with whole-word tokens for the colours and shapes;
- the scheduler is SD1.5's PNDM configuration.

Why factor 4 at 32px: the latent stays 8x8x4 like the tiny preset, so the UNet keeps its
four levels (8 -> 4 -> 2 -> 1) and the pipelines run unchanged (they read the VAE's factor
from its config). Factor 8 at 32px would leave a 4x4 latent (three downsamplings impossible);
factor 8 at 64px costs 2.5-3.5x more VAE time per step for the same 8x8 latent
(``experiments/toyworld/bench_vae_factor.py``).

    python -m idgen.toyworld.pretrain --out <dir> --seed 0 --steps 8000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn

from idgen.models import build_tiny_sd
from idgen.models.loading import sd_pipeline
from idgen.models.text import encode_text
from idgen.models.tiny import SD15_SCHEDULER_JSON, TINY_UNET
from idgen.modules.ema import EMA
from idgen.toyworld.metrics import read_image, score, to_uint8_arrays
from idgen.toyworld.render import (
    COLOURS,
    SHAPES,
    all_captions,
    caption,
    render_batch,
    render_world,
    to_tensor,
)
from idgen.utils.io import replace_dir

RESOLUTION = 32


@dataclass
class TrainingRecipe:
    """What every toy recipe's noise-prediction loop reads (``train_noise_prediction``)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_steps: int = 25
    guidance_scale: float = 2.5
    threads: int = 1


@dataclass
class Recipe(TrainingRecipe):
    """Every knob of the base's recipe; saved beside the weights."""

    steps: int = 8000  # UNet steps
    vae_steps: int = 2500  # every background (five) reconstructs well only after ~2k steps
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    eval_per_caption: int = 32


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """The tiny preset's UNet geometry (``idgen.models.tiny.TINY_UNET``) on 8x8 latents."""
    return UNet2DConditionModel(
        **{**TINY_UNET, "sample_size": RESOLUTION // 4}, cross_attention_dim=cross_attention_dim
    )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch_seed(seed: int, phase: int, step: int) -> int:
    if seed < 0 or not 0 <= phase < 10:
        raise ValueError(f"seed must be >= 0 (got {seed}) and phase in 0-9 (got {phase})")
    # Disjoint, non-negative render seeds per (recipe seed, phase 0-9, step).
    return (seed * 10 + phase) * 1_000_003 + step


def mixed_world_batch(batch_size: int, seed: int) -> torch.Tensor:
    """Half open-world, half domain (dark) images, in ``[-1, 1]``."""
    half = batch_size // 2
    light, _ = render_batch("open", batch_size - half, RESOLUTION, seed)
    dark, _ = render_batch("domain", half, RESOLUTION, seed + 500_000)
    return torch.cat([light, dark])


def train_vae(vae: AutoencoderKL, recipe: Recipe, log_every: int = 100) -> None:
    """Reconstruction (L1 + MSE) with a small KL term; fresh rendered batches every step."""
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    vae.train()
    start = time.time()
    for step in range(recipe.vae_steps):
        # 1. a fresh batch of both worlds
        x = mixed_world_batch(recipe.batch_size, _batch_seed(recipe.seed, 1, step))
        # 2. encode, sample, decode
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        # 3. loss and step
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = loss + recipe.kl_weight * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * lr_factor(step, recipe.warmup_steps, recipe.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == recipe.vae_steps - 1):
            print(
                f"vae  step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )
    vae.eval()


@torch.no_grad()
def calibrate_scaling_factor(vae: AutoencoderKL, seed: int, num_images: int = 256) -> float:
    """SD's convention: ``scaling_factor = 1 / std`` of the latents of the training images."""
    x = mixed_world_batch(num_images, _batch_seed(seed, 2, 0))
    latents = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(seed))
    return float(1.0 / latents.std())


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, seed: int, num_images: int = 96) -> dict:
    """Toy-world metrics of VAE reconstructions of each world (the VAE's ceiling)."""
    result = {}
    for world in ("open", "domain"):
        images, specs = render_world(world, num_images, RESOLUTION, _batch_seed(seed, 4, 0))
        x = to_tensor(images)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores = score((recon + 1) / 2, [s.colour for s in specs], [s.shape for s in specs])
        result[world] = {k: v for k, v in scores.items() if k != "n"}
    return result


@torch.no_grad()
def encode_captions(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """Frozen text-encoder features of ``captions`` (idgen's one prompt encoder)."""
    return encode_text(pipe.tokenizer, pipe.text_encoder, captions)


def train_noise_prediction(
    sd: StableDiffusionPipeline,
    trained: nn.Module,
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], torch.Tensor],
    recipe: TrainingRecipe,
    phase: int,
    label: str,
    log_every: int = 100,
) -> EMA:
    """The toy recipes' one training loop: epsilon prediction on fresh open-world batches.

    ``predict(noisy, t, context, specs)`` is the noise prediction whose ``trained`` parameters
    learn (the base's UNet; the ControlNet through the frozen UNet, conditioned on ``specs``).
    The VAE and text encoder stay frozen; captions are dropped to ``""`` with
    ``recipe.caption_dropout`` for classifier-free guidance. ``phase`` picks the recipe's render
    seeds (``_batch_seed``). Returns the EMA of ``trained``.
    """
    noise_scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    captions = all_captions()
    # The text encoder is frozen: every caption's features (and the empty one) are fixed.
    features = encode_captions(sd, [*captions, ""])
    empty = len(captions)
    opt = torch.optim.AdamW(trained.parameters(), lr=recipe.lr, weight_decay=1e-2)
    ema = EMA(trained, decay=recipe.ema_decay)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    sf = sd.vae.config.scaling_factor
    trained.train()
    start = time.time()
    for step in range(recipe.steps):
        # 1. a fresh open-world batch, encoded by the frozen VAE
        images, specs = render_world(
            "open", recipe.batch_size, RESOLUTION, _batch_seed(recipe.seed, phase, step)
        )
        with torch.no_grad():
            latents = sd.vae.encode(to_tensor(images)).latent_dist.sample(gen) * sf
        # 2. captions, with dropout to "" for classifier-free guidance
        index = torch.tensor([captions.index(caption(s.colour, s.shape)) for s in specs])
        drop = torch.rand(len(index), generator=gen) < recipe.caption_dropout
        context = features[torch.where(drop, empty, index)]
        # 3. noise at random timesteps; predict it
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=gen
        )
        noisy = noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(predict(noisy, t, context, specs), noise)
        # 4. optimiser and EMA
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, recipe.warmup_steps, recipe.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        ema.update(trained)
        if log_every and (step % log_every == 0 or step == recipe.steps - 1):
            print(
                f"{label} step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )
    trained.eval()
    return ema


def train_unet(pipe: StableDiffusionPipeline, recipe: Recipe, log_every: int = 100) -> EMA:
    """Text-to-image epsilon training on open-world images; returns the EMA of the UNet."""
    unet = pipe.unet

    def predict(noisy, t, context, specs):
        return unet(noisy, t, context).sample

    return train_noise_prediction(pipe, unet, predict, recipe, 3, "unet", log_every)


def evaluation_prompts(per_caption: int) -> tuple[list[str], list[str], list[str]]:
    """Every caption ``per_caption`` times, with the colours and shapes it asks for."""
    prompts, colours, shapes = [], [], []
    for colour in COLOURS:
        for shape in SHAPES:
            prompts += [f"a {colour} {shape}"] * per_caption
            colours += [colour] * per_caption
            shapes += [shape] * per_caption
    return prompts, colours, shapes


@torch.no_grad()
def evaluate_base(
    pipe: StableDiffusionPipeline,
    per_caption: int = 8,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.5,
    seed: int = 0,
) -> dict[str, float]:
    """Sample every caption with diffusers' ``StableDiffusionPipeline``; toy-world metrics."""
    prompts, colours, shapes = evaluation_prompts(per_caption)
    images = pipe(
        prompts,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    result = score(images, colours, shapes)
    # The domain (dark backgrounds) is rare in the open world: does the base still follow the
    # colour prompt there? That is what domain + control guidance builds on.
    dark = [i for i, a in enumerate(to_uint8_arrays(images)) if read_image(a).dark]
    if dark:
        on_dark = score(images[dark], [colours[i] for i in dark], [shapes[i] for i in dark])
        result.update(dark_n=float(len(dark)), dark_colour_accuracy=on_dark["colour_accuracy"])
    result.update(guidance_scale=guidance_scale, num_inference_steps=float(num_inference_steps))
    return result


def _save_atomically(pipe: StableDiffusionPipeline, out: Path, extra: dict[str, str]) -> None:
    """Write the folder next to ``out`` and swap it in, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the shipped folder private
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_card(meta: dict) -> str:
    """The README.md shipped beside the weights: what it is, how it was made, how good it is."""
    r = meta["recipe"]
    m = meta.get("metrics") or {}
    p = meta["parameters"]
    lines = [
        "# idgen toy base",
        "",
        "A text-to-image model of the toy *open world* (one red/green/blue/yellow circle, square",
        "or triangle on a light, grey, beige, slate or, rarely (15 %), dark background, captioned",
        "like `a red circle`: the caption never names the background) in Stable Diffusion 1.5",
        "layout: `idgen.models.load_sd(<this folder>)` returns a diffusers `StableDiffusionPipeline`.",
        f"{meta['resolution']}x{meta['resolution']} images, VAE factor {meta['vae_scale_factor']}"
        f" (8x8x4 latents, scaling_factor {meta['scaling_factor']:.4f}); parameters: UNet"
        f" {p['unet']:,}, VAE {p['vae']:,}, text encoder {p['text_encoder']:,} (random, frozen).",
        "",
        "## Recipe (`idgen/toyworld/pretrain.py`)",
        "",
        "```",
        f"python -m idgen.toyworld.pretrain --out <dir> --seed {r['seed']} --steps {r['steps']}"
        f" --vae-steps {r['vae_steps']} --batch-size {r['batch_size']}",
        "```",
        "",
        f"VAE {r['vae_steps']} steps on both worlds (L1+MSE, KL weight {r['kl_weight']}), then the"
        f" UNet {r['steps']} steps at batch {r['batch_size']} on open-world images, lr {r['lr']}"
        f" (warm-up, cosine), {r['caption_dropout']:.0%} caption dropout, EMA {r['ema_decay']}.",
        f"Time on {r['threads']} CPU thread(s): "
        + ", ".join(
            f"{k.replace('_seconds', '')} {v / 60:.1f} min" for k, v in meta["timings"].items()
        )
        + f" (torch {meta['torch']}).",
        "",
        "## Measured",
        "",
    ]
    if m:
        lines += [
            f"diffusers `StableDiffusionPipeline`, PNDM {int(m['num_inference_steps'])} steps, guidance"
            f" {m['guidance_scale']}, {int(m['n'])} samples (every caption {r['eval_per_caption']}x, seed 1234):",
            "",
            "| colour accuracy | shape accuracy | no object | dark background |"
            " colour accuracy on its dark samples |",
            "| --- | --- | --- | --- | --- |",
            f"| {m['colour_accuracy']:.3f} | {m['shape_accuracy']:.3f} | {m['no_object_rate']:.3f}"
            f" | {m['dark_fraction']:.3f} | {m.get('dark_colour_accuracy', float('nan')):.3f}"
            f" (n = {int(m.get('dark_n', 0))}) |",
            "",
        ]
    v = meta.get("vae_reconstruction_metrics") or {}
    for world, scores in v.items():
        lines.append(
            f"VAE reconstructions, {world} world: colour {scores['colour_accuracy']:.3f}, shape"
            f" {scores['shape_accuracy']:.3f}, dark {scores['dark_fraction']:.3f}."
        )
    lines += [
        "",
        "Metrics: `idgen.toyworld.metrics` (pixel statistics). All numbers: `toyworld.json`.",
    ]
    return "\n".join(lines) + "\n"


def pretrain(out: str | os.PathLike, recipe: Recipe, log_every: int = 100) -> dict:
    """Run the whole recipe, save the base to ``out`` and return its metadata."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    timings: dict[str, float] = {}
    # 1. tokenizer + frozen random text encoder of the tiny preset; fresh VAE and UNet
    tiny = build_tiny_sd(seed=recipe.seed)
    torch.manual_seed(recipe.seed)
    vae = build_vae()
    unet = build_unet(tiny.text_encoder.config.hidden_size)
    pipe = sd_pipeline(
        vae,
        tiny.text_encoder.requires_grad_(False).eval(),
        tiny.tokenizer,
        unet,
        PNDMScheduler.from_config(SD15_SCHEDULER_JSON),  # SD1.5's, clip_sample included
    )
    # 2. the VAE on both worlds, then its latent scale
    start = time.time()
    train_vae(vae, recipe, log_every)
    vae.requires_grad_(False)
    vae.register_to_config(scaling_factor=calibrate_scaling_factor(vae, recipe.seed))
    timings["vae_seconds"] = time.time() - start
    vae_metrics = reconstruction_metrics(vae, recipe.seed)
    print(f"vae reconstructions: {json.dumps(vae_metrics)}", flush=True)
    # 3. the text-to-image UNet on the open world
    start = time.time()
    ema = train_unet(pipe, recipe, log_every)
    ema.copy_to(unet)
    timings["unet_seconds"] = time.time() - start
    # 4. measure what we ship
    metrics = {}
    if recipe.eval_per_caption:
        start = time.time()
        metrics = evaluate_base(
            pipe, recipe.eval_per_caption, recipe.eval_steps, recipe.guidance_scale, seed=1234
        )
        timings["eval_seconds"] = time.time() - start
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("vae", "text_encoder", "unet")
    }
    meta = {
        "recipe": asdict(recipe),
        "resolution": RESOLUTION,
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "scaling_factor": vae.config.scaling_factor,
        "parameters": params,
        "timings": timings,
        "metrics": metrics,
        "vae_reconstruction_metrics": vae_metrics,
        "torch": torch.__version__,
    }
    _save_atomically(
        pipe,
        Path(out),
        {"toyworld.json": json.dumps(meta, indent=2) + "\n", "README.md": model_card(meta)},
    )
    return meta


def main(argv: list[str] | None = None) -> dict:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the diffusers base into")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    meta = pretrain(out, Recipe(**args))
    print(json.dumps({"timings": meta["timings"], "metrics": meta["metrics"]}, indent=2))
    return meta


if __name__ == "__main__":
    main()
