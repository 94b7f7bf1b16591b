"""Pretraining recipe of the toy ControlNet: the toy base's spatial control by the object's mask.

A diffusers ``ControlNetModel`` made with ``ControlNetModel.from_unet(base.unet)`` (the base's
encoder copied, zero convolutions), with a conditioning embedding of three levels because the
toy VAE downsamples by 4, not SD's 8. It is trained like ControlNet (Zhang et al. 2023) with the
base frozen: open-world images (every background), their captions (10 % dropped to ""), and as
condition the mask of the image's object (``idgen.toyworld.conditions.render_mask``, white on
black, in [0, 1] as diffusers' ControlNet pipelines feed it). Measured at the end: the IoU
between each condition and the foreground of a sample drawn with and without the ControlNet
(the control term only, as idgen-sample's ``sampler=controlnet`` uses it).

    python -m idgen.toyworld.pretrain_controlnet --base idgen/toyworld/base --out <dir>

The shipped one lives in ``idgen/toyworld/controlnet`` (``CONTROLNET_DIR``) and is what
``idgen-sample model=toyworld sampler=controlnet_toyworld`` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel

from idgen.models import load_sd
from idgen.modules.ema import EMA
from idgen.toyworld.conditions import mask_iou, render_mask
from idgen.toyworld.metrics import score, to_uint8_arrays
from idgen.toyworld.pretrain import (
    RESOLUTION,
    TrainingRecipe,
    _batch_seed,
    _save_atomically,
    train_noise_prediction,
)
from idgen.toyworld.render import caption, render_world, to_tensor

# Recipe phase for ``_batch_seed``: the base's recipe uses 1-4, so the batches differ from its.
_TRAIN_PHASE, _EVAL_PHASE = 5, 6
# Channels of the conditioning embedding: 32px -> 8px latents is two stride-2 convolutions,
# so three entries (SD's four assume the 8x VAE).
EMBEDDING_CHANNELS = (16, 32, 64)


@dataclass
class Recipe(TrainingRecipe):
    """Every knob of the ControlNet's recipe; saved beside the weights."""

    steps: int = 1200
    warmup_steps: int = 50
    ema_decay: float = 0.99
    eval_num: int = 48
    # The ControlNet acts in the control term only, so w_c amplifies its residuals too: at
    # scale 1 and w_c 2.5 samples took the mask's look (dark backgrounds, colour 0.47 on a
    # validation set); 0.5 kept colour (0.84) and placed objects better (IoU 0.78 vs 0.71).
    # idgen/conf/sampler/controlnet_toyworld.yaml uses the same value.
    conditioning_scale: float = 0.5


def condition_tensor(specs) -> torch.Tensor:
    """``[B, 3, H, W]`` masks in ``[0, 1]`` (what diffusers' control image processor gives)."""
    return (to_tensor([render_mask(s, RESOLUTION) for s in specs]) + 1) / 2


def train_controlnet(sd, controlnet: ControlNetModel, recipe: Recipe, log_every: int = 100) -> EMA:
    """Noise-prediction loss of the frozen base + ControlNet residuals; returns the EMA."""
    unet = sd.unet.requires_grad_(False).eval()
    sd.vae.requires_grad_(False).eval()

    def predict(noisy, t, context, pooled, specs):
        # the mask alone must place the object too: captions are dropped as for the base
        down, mid = controlnet(
            noisy, t, context, controlnet_cond=condition_tensor(specs), return_dict=False
        )
        return unet(
            noisy,
            t,
            context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    return train_noise_prediction(
        sd, controlnet, predict, recipe, _TRAIN_PHASE, "controlnet", log_every
    )


@torch.no_grad()
def alignment(
    sd,
    controlnet: ControlNetModel,
    num: int = 48,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.5,
    seed: int = 0,
    world: str = "open",
    conditioning_scale: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Mask IoU, colour accuracy and dark fraction with and without the ControlNet.

    ``num`` conditions of ``world``, each sampled with its own caption, the same seeds in both
    arms, through ``InDomainPipeline`` (classifier-free guidance ``guidance_scale``; the
    ControlNet in the control term only, as ``sampler=controlnet`` does).
    """
    from idgen.pipelines import InDomainPipeline

    images, specs = render_world(world, num, RESOLUTION, _batch_seed(seed, _EVAL_PHASE, 0))
    del images
    masks = [render_mask(s, RESOLUTION) for s in specs]
    prompts = [caption(s.colour, s.shape) for s in specs]
    pipe = InDomainPipeline.from_sd(sd, controlnet=controlnet)
    result = {}
    for arm, control in (("with_controlnet", masks), ("without_controlnet", None)):
        out = pipe(
            prompts,
            w_d=0.0,
            w_c=guidance_scale,
            weights="fixed",
            num_inference_steps=num_inference_steps,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(num)],
            control_image=control,
            controlnet_conditioning_scale=conditioning_scale,
            output_type="pt",
        ).images
        arrays = to_uint8_arrays(out)
        ious = [mask_iou(a, np.asarray(m)) for a, m in zip(arrays, masks, strict=True)]
        scores = score(out, [s.colour for s in specs], [s.shape for s in specs])
        result[arm] = {
            "mask_iou": float(np.mean(ious)),
            "colour_accuracy": scores["colour_accuracy"],
            "dark_fraction": scores["dark_fraction"],
            "n": float(num),
        }
    return result


def model_card(meta: dict) -> str:
    """The README.md shipped beside the weights."""
    r, m = meta["recipe"], meta.get("metrics") or {}
    lines = [
        "# idgen toy ControlNet",
        "",
        "Spatial control of the idgen toy base by the object's mask (white on black, 32px): a",
        "diffusers `ControlNetModel` (`ControlNetModel.from_pretrained(<this folder>)`) made with",
        f"`ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels="
        f"{tuple(meta['conditioning_embedding_out_channels'])})`; {meta['parameters']:,} parameters.",
        "",
        "## Recipe (`idgen/toyworld/pretrain_controlnet.py`)",
        "",
        "```",
        f"python -m idgen.toyworld.pretrain_controlnet --base <toy base> --out <dir>"
        f" --seed {r['seed']} --steps {r['steps']} --batch-size {r['batch_size']}",
        "```",
        "",
        f"{r['steps']} steps at batch {r['batch_size']} on open-world images and their masks, base"
        f" frozen, lr {r['lr']} (warm-up, cosine), {r['caption_dropout']:.0%} caption dropout,"
        f" EMA {r['ema_decay']}. Time on {r['threads']} CPU thread(s):"
        f" {meta['timings']['train_cpu_seconds'] / 60:.1f} min of CPU"
        f" ({meta['timings']['train_seconds'] / 60:.1f} min wall clock; torch {meta['torch']}).",
        "",
    ]
    if m:
        lines += [
            "## Measured",
            "",
            f"{int(m['with_controlnet']['n'])} open-world masks, each sampled with its caption"
            f" (DPM-Solver++ {r['eval_steps']} steps, guidance {r['guidance_scale']}, the ControlNet"
            f" in the control term at conditioning scale {r.get('conditioning_scale', 1.0)}, the"
            " same seeds in both rows):",
            "",
            "| | mask IoU ↑ | colour accuracy | dark background |",
            "| --- | --- | --- | --- |",
        ]
        for arm in ("with_controlnet", "without_controlnet"):
            a = m[arm]
            lines.append(
                f"| {arm.replace('_', ' ')} | {a['mask_iou']:.3f} | {a['colour_accuracy']:.3f}"
                f" | {a['dark_fraction']:.3f} |"
            )
        lines.append("")
    lines.append("All numbers: `toyworld_controlnet.json`.")
    return "\n".join(lines) + "\n"


def pretrain_controlnet(
    base: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, log_every: int = 100
) -> dict:
    """Train the ControlNet on ``base``, measure it, save it to ``out``; returns its metadata."""
    torch.set_num_threads(recipe.threads)
    sd = load_sd(str(base))
    sd.set_progress_bar_config(disable=True)
    if (
        sd.vae.config.sample_size != RESOLUTION
        or 2 ** (len(sd.vae.config.block_out_channels) - 1) != 4
    ):
        raise ValueError(
            f"--base {base}: expected the toy base's layout (32px, VAE factor 4); make one with "
            "`python -m idgen.toyworld.pretrain`."
        )
    torch.manual_seed(recipe.seed)
    controlnet = ControlNetModel.from_unet(
        sd.unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS
    )
    start, cpu = time.time(), time.process_time()
    ema = train_controlnet(sd, controlnet, recipe, log_every)
    ema.copy_to(controlnet)
    # CPU time too: on a shared machine the wall clock says more about the neighbours.
    timings = {"train_seconds": time.time() - start, "train_cpu_seconds": time.process_time() - cpu}
    metrics = {}
    if recipe.eval_num:
        start = time.time()
        metrics = alignment(
            sd,
            controlnet,
            recipe.eval_num,
            recipe.eval_steps,
            recipe.guidance_scale,
            seed=1234,
            conditioning_scale=recipe.conditioning_scale,
        )
        timings["eval_seconds"] = time.time() - start
    meta = {
        "recipe": asdict(recipe),
        "base": Path(base).name,
        "conditioning_embedding_out_channels": list(EMBEDDING_CHANNELS),
        "parameters": sum(p.numel() for p in controlnet.parameters()),
        "timings": timings,
        "metrics": metrics,
        "torch": torch.__version__,
    }
    _save_atomically(
        controlnet,
        Path(out),
        {
            "toyworld_controlnet.json": json.dumps(meta, indent=2) + "\n",
            "README.md": model_card(meta),
        },
    )
    return meta


def main(argv: list[str] | None = None) -> dict:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the toy base (diffusers folder)")
    parser.add_argument("--out", required=True, help="folder to write the ControlNet into")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    base, out = args.pop("base"), args.pop("out")
    if not Path(base, "unet").is_dir():
        raise SystemExit(f"--base '{base}' is not a diffusers folder with a unet/ (the toy base)")
    meta = pretrain_controlnet(base, out, Recipe(**args))
    print(json.dumps({"timings": meta["timings"], "metrics": meta["metrics"]}, indent=2))
    return meta


if __name__ == "__main__":
    main()
