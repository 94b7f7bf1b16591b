"""Load the toy base, optionally with an exported Table-1 baseline applied (for idgen-sample)."""

from __future__ import annotations

import os

from diffusers import StableDiffusionPipeline

from idgen.baselines.export import load_baseline_pipeline
from idgen.models import load_sd
from idgen.toyworld import BASE_DIR


def load_with_baseline(
    pretrained: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
    torch_dtype=None,
    variant: str | None = None,
) -> StableDiffusionPipeline:
    """``load_sd(pretrained)`` with the baseline exported in ``baseline`` applied to it.

    ``pretrained`` defaults to the shipped toy base. Lets idgen-sample draw from a fine-tuned
    baseline with the same prompts, seeds and sampler as the other rows of a comparison.
    """
    if baseline is None:
        raise ValueError(
            "model.baseline is not set: give the folder a baseline training exported "
            "(<run dir>/baseline_model), e.g. model.baseline=outputs/toyworld/finetune/baseline_model."
        )
    base = load_sd(pretrained or BASE_DIR, torch_dtype=torch_dtype, variant=variant)
    return load_baseline_pipeline(baseline, base)
