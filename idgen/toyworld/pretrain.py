"""Pretraining recipe of the toy base: a text-to-image model of the open world.

The base is a diffusers folder in SD1.5 layout (``--family sdxl`` / ``sd3``: that family's
layout, ``idgen.toyworld.bases``) that ``idgen.models.load_sd`` loads:

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
    python -m idgen.toyworld.pretrain --family sdxl --vae-from idgen/toyworld/base --out <dir>

SDXL and SD3 bases learn the same way through their family (``idgen.models.family``): its
prompt encoder (both CLIPs, pooled text), its unconditional input for caption dropout (SDXL:
zeros, as ``force_zeros_for_empty_prompt``), its added conditions (SDXL's size ids) and its
objective (SD3: flow matching, ``idgen.modules.flow_matching``). ``--vae-from`` reuses the VAE
of another toy base with the same latent channels (SDXL's VAE has SD1.5's layout).
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from idgen.data.latents import latents_from_batch
from idgen.models.family import family_of
from idgen.modules.diffusion_loss import denoising_loss
from idgen.modules.ema import EMA
from idgen.modules.flow_matching import flow_matching_loss, flow_sigmas
from idgen.toyworld.bases import RESOLUTION, build_vae, toy_pipeline, vae_latent_channels
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

    family: str = "sd15"  # the base's model family: sd15, sdxl, sd3 (idgen.toyworld.bases)
    steps: int = 8000  # UNet steps
    vae_steps: int = 2500  # every background (five) reconstructs well only after ~2k steps
    vae_from: str = ""  # a toy base folder whose VAE to reuse (then vae_steps is not run)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    eval_per_caption: int = 32


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
def calibrate_latent_scale(
    vae: AutoencoderKL, seed: int, num_images: int = 256
) -> dict[str, float]:
    """SD's convention: ``scaling_factor = 1 / std`` of the training images' latents; a VAE
    with a ``shift_factor`` (SD3's) also gets their mean as the shift, the scale then being
    ``1 / std`` around it."""
    x = mixed_world_batch(num_images, _batch_seed(seed, 2, 0))
    latents = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(seed))
    if getattr(vae.config, "shift_factor", None) is None:
        return {"scaling_factor": float(1.0 / latents.std())}
    shift = float(latents.mean())
    return {"scaling_factor": float(1.0 / (latents - shift).std()), "shift_factor": shift}


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


def train_noise_prediction(
    sd: Any,
    trained: nn.Module,
    predict: Callable[..., torch.Tensor],
    recipe: TrainingRecipe,
    phase: int,
    label: str,
    log_every: int = 100,
) -> EMA:
    """The toy recipes' one training loop: the family's objective on fresh open-world batches.

    ``predict(noisy, t, context, pooled, specs)`` is the denoiser output whose ``trained``
    parameters learn (the base's UNet or transformer; the ControlNet through the frozen UNet,
    conditioned on ``specs``); ``pooled`` is None for families without pooled text. The loss is
    the family's (``idgen.models.family``): epsilon prediction on the DDPM schedule, or SD3's
    flow matching. The VAE and text encoders stay frozen; captions are dropped to the family's
    unconditional input (``""``; SDXL: zeros) with ``recipe.caption_dropout`` for
    classifier-free guidance. ``phase`` picks the recipe's render seeds (``_batch_seed``).
    Returns the EMA of ``trained``.
    """
    family = family_of(sd)
    flow = family.training_objective == "flow_matching"
    if flow:
        sigmas = flow_sigmas(sd.scheduler.config)
    else:
        noise_scheduler = DDPMScheduler.from_config(sd.scheduler.config)
        alphas_cumprod = noise_scheduler.alphas_cumprod.float()
        prediction_type = noise_scheduler.config.prediction_type
    captions = all_captions()
    # The text encoders are frozen: every caption's features (and the unconditional) are fixed.
    features, pooled = family.encode_prompt(sd, captions, "cpu")
    uncond, uncond_pooled = family.uncond_embeds(
        sd, features[:1], None if pooled is None else pooled[:1]
    )
    opt = torch.optim.AdamW(trained.parameters(), lr=recipe.lr, weight_decay=1e-2)
    ema = EMA(trained, decay=recipe.ema_decay)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    trained.train()
    start = time.time()
    for step in range(recipe.steps):
        # 1. a fresh open-world batch, encoded by the frozen VAE
        images, specs = render_world(
            "open", recipe.batch_size, RESOLUTION, _batch_seed(recipe.seed, phase, step)
        )
        with torch.no_grad():
            latents = latents_from_batch({"pixel_values": to_tensor(images)}, sd.vae, gen)
        # 2. captions, with dropout to the unconditional input for classifier-free guidance
        index = torch.tensor([captions.index(caption(s.colour, s.shape)) for s in specs])
        drop = torch.rand(len(index), generator=gen) < recipe.caption_dropout
        context = torch.where(drop[:, None, None], uncond, features[index])
        rows_pooled = None
        if pooled is not None:
            rows_pooled = torch.where(drop[:, None], uncond_pooled, pooled[index])

        def denoise(noisy, t, context=context, rows_pooled=rows_pooled, specs=specs):
            return predict(noisy, t, context, rows_pooled, specs)

        # 3. noise at random timesteps (sigmas); the family's target
        if flow:
            loss = flow_matching_loss(denoise, latents, sigmas, generator=gen)
        else:
            loss = denoising_loss(denoise, latents, alphas_cumprod, prediction_type, gen)
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


def train_denoiser(pipe: Any, recipe: Recipe, log_every: int = 100) -> EMA:
    """Text-to-image training of the base's denoiser (UNet, or SD3's transformer) on
    open-world images; returns its EMA. SDXL's size ids are those of every toy image (32x32,
    no crop), which is what ``StableDiffusionXLPipeline`` passes at 32px."""
    family = family_of(pipe)
    model = family.denoiser(pipe)
    size = torch.tensor([RESOLUTION, RESOLUTION])
    time_ids = family.time_ids(size, torch.zeros(2), size)

    def predict(noisy, t, context, pooled, specs):
        ids = None if time_ids is None else time_ids.expand(noisy.shape[0], -1)
        return family.predict(model, noisy, t, context, pooled, ids)

    label = "unet" if family.denoiser_name == "unet" else family.denoiser_name[:4]
    return train_noise_prediction(pipe, model, predict, recipe, 3, label, log_every)


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
    pipe: Any,
    per_caption: int = 8,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.5,
    seed: int = 0,
) -> dict[str, float]:
    """Sample every caption with the family's diffusers pipeline (``pipe``, e.g.
    ``StableDiffusionPipeline``); toy-world metrics."""
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


def _save_atomically(pipe: Any, out: Path, extra: dict[str, str]) -> None:
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
    p = dict(meta["parameters"])
    family = meta.get("family", "sd15")
    pipeline = meta.get("pipeline", "StableDiffusionPipeline")
    layout = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL", "sd3": "SD3"}[family]
    denoiser = "transformer" if "transformer" in p else "unet"
    denoiser_title = "transformer" if denoiser == "transformer" else "UNet"
    load = "" if family == "sd15" else f", family='{family}'"
    shift = meta.get("shift_factor")
    latent = (
        f"8x8x{meta.get('latent_channels', 4)} latents, scaling_factor {meta['scaling_factor']:.4f}"
        + (f", shift_factor {shift:.4f}" if shift is not None else "")
    )
    encoders = sum(v for k, v in p.items() if k.startswith("text_encoder"))
    vae_line = (
        f"The VAE of `{r['vae_from']}` (reused), then the"
        if r.get("vae_from")
        else f"VAE {r['vae_steps']} steps on both worlds (L1+MSE, KL weight {r['kl_weight']}), then"
        " the"
    )
    command = (
        f"python -m idgen.toyworld.pretrain --out <dir> --seed {r['seed']} --steps {r['steps']}"
    )
    if family != "sd15":
        command += f" --family {family}"
    command += (
        f" --vae-from {r['vae_from']}" if r.get("vae_from") else f" --vae-steps {r['vae_steps']}"
    )
    command += f" --batch-size {r['batch_size']} --lr {r['lr']:g}"
    lines = [
        f"# idgen toy base ({layout})" if family != "sd15" else "# idgen toy base",
        "",
        "A text-to-image model of the toy *open world* (one red/green/blue/yellow circle, square",
        "or triangle on a light, grey, beige, slate or, rarely (15 %), dark background, captioned",
        f"like `a red circle`: the caption never names the background) in {layout} layout:",
        f"`idgen.models.load_sd(<this folder>{load})` returns a diffusers `{pipeline}`.",
        f"{meta['resolution']}x{meta['resolution']} images, VAE factor {meta['vae_scale_factor']}"
        f" ({latent}); parameters: {denoiser_title} {p[denoiser]:,}, VAE {p['vae']:,}, text"
        f" encoder(s) {encoders:,} (random, frozen).",
        "",
        "## Recipe (`idgen/toyworld/pretrain.py`)",
        "",
        "```",
        command,
        "```",
        "",
        f"{vae_line} {denoiser_title} {r['steps']} steps at batch {r['batch_size']} on open-world images,"
        f" lr {r['lr']} (warm-up, cosine), {r['caption_dropout']:.0%} caption dropout, EMA"
        f" {r['ema_decay']}.",
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
        scheduler = meta.get("scheduler", "PNDMScheduler").replace("Scheduler", "")
        lines += [
            f"diffusers `{pipeline}`, {scheduler} {int(m['num_inference_steps'])} steps, guidance"
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


def _build_or_reuse_vae(recipe: Recipe) -> AutoencoderKL:
    """A fresh toy VAE for the family, or ``recipe.vae_from``'s trained one."""
    channels = vae_latent_channels(recipe.family)
    if not recipe.vae_from:
        return build_vae(recipe.family)
    vae = AutoencoderKL.from_pretrained(Path(recipe.vae_from) / "vae")
    if vae.config.latent_channels != channels:
        raise ValueError(
            f"--vae-from {recipe.vae_from}: its VAE has {vae.config.latent_channels} latent "
            f"channels, a {recipe.family} base needs {channels}; train one (drop --vae-from)."
        )
    return vae


def pretrain(out: str | os.PathLike, recipe: Recipe, log_every: int = 100) -> dict:
    """Run the whole recipe, save the base to ``out`` and return its metadata."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    timings: dict[str, float] = {}
    # 1. a fresh (or reused) VAE, then the family's toy base around it: the tiny preset's
    # tokenizers and frozen random text encoders, a fresh denoiser, the family's scheduler
    vae = _build_or_reuse_vae(recipe)
    pipe = toy_pipeline(recipe.family, recipe.seed, vae)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    # 2. the VAE on both worlds, then its latent scale (and shift)
    if not recipe.vae_from:
        start = time.time()
        train_vae(vae, recipe, log_every)
        vae.register_to_config(**calibrate_latent_scale(vae, recipe.seed))
        timings["vae_seconds"] = time.time() - start
    vae.requires_grad_(False).eval()
    vae_metrics = reconstruction_metrics(vae, recipe.seed)
    print(f"vae reconstructions: {json.dumps(vae_metrics)}", flush=True)
    # 3. the text-to-image denoiser on the open world
    start = time.time()
    ema = train_denoiser(pipe, recipe, log_every)
    ema.copy_to(denoiser)
    timings[f"{family.denoiser_name}_seconds"] = time.time() - start
    # 4. measure what we ship
    metrics = {}
    if recipe.eval_per_caption:
        start = time.time()
        metrics = evaluate_base(
            pipe, recipe.eval_per_caption, recipe.eval_steps, recipe.guidance_scale, seed=1234
        )
        timings["eval_seconds"] = time.time() - start
    parts = ("vae", "text_encoder", "text_encoder_2", family.denoiser_name)
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in parts
        if getattr(pipe, name, None) is not None
    }
    meta = {
        "family": family.name,
        "pipeline": family.txt2img.__name__,
        "recipe": asdict(recipe),
        "resolution": RESOLUTION,
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "latent_channels": vae.config.latent_channels,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "scheduler": type(pipe.scheduler).__name__,
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
