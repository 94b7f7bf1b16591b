"""What ``SamplerSettings`` paths open to: the base SD, ControlNets, images, extra guidance models.

Loaded once, when sampling starts (``DecoupledGuidanceSampling``), never at config time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idgen.guidance import GuidanceTerm
from idgen.models.single_file import is_single_file, load_single_file_models
from idgen.sampling.settings import SamplerSettings


@dataclass
class SamplingComponents:
    """Opened inputs of one sampler: the base pipeline and everything beside it."""

    base: Any  # the frozen SD (or the baseline's pipeline in baseline_mode="pipeline")
    controlnet: Any = None
    control_image: Any = None
    image: Any = None
    extra: list[GuidanceTerm | None] = field(default_factory=list)  # None: the baseline's slot
    baseline: Any = None  # baseline_mode="rectify": the baseline pipeline (its UNet is a term)
    baseline_term: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> list[nn.Module]:
        """Models outside the pipeline's components: extra terms and the rectified baseline."""
        modules = [
            m
            for term in self.extra
            if term is not None
            for m in (term.model, term.text_encoder)
            if isinstance(m, nn.Module)
        ]
        if self.baseline is not None:
            modules += [self.baseline.unet, self.baseline.text_encoder]
        return modules

    def extra_terms(self, prompts: Sequence[str]) -> list[GuidanceTerm]:
        """The extra terms of one call; the baseline's (rectify mode) gets these prompts' features."""
        if self.baseline is None:
            return [t for t in self.extra if t is not None]
        from idgen.baselines.sampling import baseline_prompt_embeds

        spec = dict(self.baseline_term)
        own = spec.pop("prompt", None)
        if self.baseline.text_encoder is self.base.text_encoder:
            # A baseline that learned no token shares the frozen base's text encoders: the
            # pipeline encodes its prompt (the call's, or its own) as for any term, with every
            # input the family needs (SDXL: both encoders and the pooled vector).
            term = GuidanceTerm(model=self.baseline.unet, prompt=own, **spec)
            return [term if t is None else t for t in self.extra]
        # The baseline's own encoder and tokenizer ([V] tokens), as diffusers would encode them.
        texts = list(prompts) if own is None else [own]
        embeds = torch.cat([baseline_prompt_embeds(self.baseline, p) for p in texts])
        term = GuidanceTerm(model=self.baseline.unet, prompt_embeds=embeds, **spec)
        return [term if t is None else t for t in self.extra]


def load_components(
    sd: Callable[[], Any] | Any, settings: SamplerSettings, baseline_model: str | None = None
) -> SamplingComponents:
    """Open everything ``settings`` (and ``baseline_model``) name; ``sd``: a pipeline or a loader."""
    from diffusers import ControlNetModel, DiffusionPipeline, UNet2DConditionModel

    s = settings
    rectify = bool(baseline_model) and s.baseline_mode == "rectify"
    s.check_required(provided=["extra_guidance.0.model"] if rectify else [])
    sd = sd if isinstance(sd, DiffusionPipeline) else sd()
    if s.lora:
        from idgen.models.lora import load_loras

        load_loras(sd, [dict(spec) for spec in s.lora], "sampler.lora")
    out = SamplingComponents(base=sd)
    if baseline_model:
        from idgen.baselines import load_baseline_pipeline
        from idgen.models.family import family_of

        family = family_of(sd)
        if rectify:
            family.require("baseline_rectify", "sampler.baseline_mode", s.baseline_mode)
        baseline = load_baseline_pipeline(existing(baseline_model, "baseline_model"), sd)
        family.denoiser(baseline).requires_grad_(False).eval()
        if rectify:
            out.baseline = baseline  # SD stays the base: its uncond rectifies the baseline
            out.baseline_term = _baseline_term_spec(s.extra_guidance)
        else:
            out.base = baseline  # standard CFG with the baseline's parts
    if s.controlnet:
        paths = s.controlnet if isinstance(s.controlnet, list | tuple) else [s.controlnet]
        nets = [ControlNetModel.from_pretrained(existing(p, "sampler.controlnet")) for p in paths]
        out.controlnet = nets[0] if len(nets) == 1 else nets
    out.control_image = load_images(s.control_image, "sampler.control_image")
    out.image = load_images(s.image, "sampler.image")
    for i, spec in enumerate(s.extra_guidance):
        spec = dict(spec)
        if rectify and i == 0:
            out.extra.append(None)
            continue
        model = spec.pop("model", None)
        loras = [dict(x) for x in spec.pop("lora", None) or []]
        if model is not None:
            path = existing(model, f"sampler.extra_guidance[{i}].model")
            if is_single_file(path):
                # A community single file: its UNet and text encoder in the base's geometry.
                model, spec["text_encoder"] = load_single_file_models(path, sd)
            else:
                sub = "unet" if (path / "unet").is_dir() else None
                model = UNet2DConditionModel.from_pretrained(path, subfolder=sub)
                if (path / "text_encoder").is_dir():
                    # A community pipeline folder may ship a fine-tuned text encoder: use it.
                    from transformers import CLIPTextModel

                    encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
                    spec["text_encoder"] = encoder.requires_grad_(False).eval()
            model.requires_grad_(False).eval()
        if loras:
            model, spec["text_encoder"] = _term_with_loras(
                sd, model, spec.get("text_encoder"), loras, i
            )
        out.extra.append(GuidanceTerm(model=model, **spec))
    return out


def _term_with_loras(sd: Any, unet: Any, text_encoder: Any, loras: list[dict], i: int):
    """A term's UNet and text encoder with its own LoRAs: the term's models, or copies of the
    frozen SD's (so the LoRA acts on this term only, the paper's customized control model)."""
    import copy

    from idgen.models.loading import sd_pipeline
    from idgen.models.lora import load_loras

    unet = copy.deepcopy(sd.unet) if unet is None else unet
    text_encoder = copy.deepcopy(sd.text_encoder) if text_encoder is None else text_encoder
    holder = sd_pipeline(sd.vae, text_encoder, sd.tokenizer, unet, sd.scheduler)
    load_loras(holder, loras, f"sampler.extra_guidance[{i}].lora")
    return unet.requires_grad_(False).eval(), text_encoder.requires_grad_(False).eval()


def _baseline_term_spec(extra_guidance: list[dict[str, Any]]) -> dict[str, Any]:
    """``extra_guidance[0]`` (weight, interval, prompt) as the rectified baseline's term."""
    if not extra_guidance:
        raise ValueError(
            "sampler.baseline_mode=rectify takes the baseline term's weight from "
            "sampler.extra_guidance.0; use sampler=rectify or add an extra_guidance entry."
        )
    spec = dict(extra_guidance[0])
    if spec.pop("model", None) is not None:
        raise ValueError(
            "baseline_model fills sampler.extra_guidance.0.model in rectify mode; give one of "
            "the two (set sampler.extra_guidance.0.model=null)."
        )
    spec["name"] = "baseline"
    return spec


def existing(path: str | os.PathLike, field_name: str) -> Path:
    """``path`` as a Path, or a clear error naming the setting that gave it."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{field_name}='{p}' does not exist; check the path.")
    return p


def load_images(paths: str | list[str] | None, field_name: str):
    """One RGB image, a list of them, or None; read as training reads its images (EXIF
    orientation, alpha on white, 16-bit scaled; an unreadable file is an error naming it)."""
    if paths is None:
        return None
    from idgen.data.images import load_rgb

    many = isinstance(paths, list | tuple)
    images = [load_rgb(existing(p, field_name)) for p in (paths if many else [paths])]
    return images if many else images[0]
