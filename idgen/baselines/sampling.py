"""Sampling a baseline: standard CFG, or CFG with unconditional guidance rectification (§4.5).

Rectified: ``eps = eps_sd(z, "") + w (eps_baseline(z, c) - eps_sd(z, ""))`` where ``eps_sd`` is
the *frozen* SD's unconditional prediction, built with :class:`InDomainPipeline` and the
baseline UNet as one extra :class:`GuidanceTerm`. With an unchanged baseline this is exactly
classifier-free guidance with scale ``w``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline

from idgen.guidance import GuidanceTerm
from idgen.pipelines.in_domain import InDomainPipeline, make_scheduler


def with_scheduler(pipe: StableDiffusionPipeline, name: str = "dpm++") -> StableDiffusionPipeline:
    """The same pipeline components with a fresh scheduler (DPM-Solver++ as in the paper)."""
    components = dict(pipe.components)
    components["scheduler"] = make_scheduler(pipe.scheduler.config, name)
    new = StableDiffusionPipeline(**components)
    new.set_progress_bar_config(disable=True)
    return new


@torch.no_grad()
def baseline_prompt_embeds(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """Text features as ``pipe`` computes them (multi-vector tokens expanded)."""
    embeds, _ = pipe.encode_prompt(
        prompt, pipe._execution_device, 1, do_classifier_free_guidance=False
    )
    return embeds


@torch.no_grad()
def sample_baseline(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    rectify_with: StableDiffusionPipeline | None = None,
    scheduler: str = "dpm++",
    output_type: str = "pil",
) -> list:
    """One image per (prompt, seed); ``rectify_with`` = the frozen SD for the unconditional term."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts for {len(seeds)} seeds; give one seed each.")
    images = []
    if rectify_with is None:
        cfg_pipe = with_scheduler(pipe, scheduler)
        for prompt, seed in zip(prompts, seeds, strict=True):
            out = cfg_pipe(
                prompt,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(int(seed)),
                output_type=output_type,
            )
            images.append(out.images[0])
        return images
    rectified = InDomainPipeline.from_sd(rectify_with, scheduler=scheduler)
    for prompt, seed in zip(prompts, seeds, strict=True):
        embeds = baseline_prompt_embeds(pipe, prompt)
        term = GuidanceTerm(
            name="baseline", model=pipe.unet, prompt_embeds=embeds, weight=guidance_scale
        )
        out = rectified(
            prompt_embeds=embeds,
            w_d=0,
            w_c=0,
            weights="fixed",
            extra_guidance=[term],
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(int(seed)),
            output_type=output_type,
        )
        images.append(out.images[0])
    return images
