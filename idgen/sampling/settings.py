"""What decides an image besides its prompt and seed: ``idgen/conf/sampler/*.yaml`` -> pipeline arguments.

``SamplerSettings.pipeline_kwargs`` is the one place where settings become ``InDomainPipeline``
arguments; ``w_d`` / ``w_c`` become the first two guidance terms there
(:func:`idgen.guidance.decoupled_terms`), mixed by :class:`idgen.guidance.Guider`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from idgen.guidance import GuidanceTerm, decoupled_terms

BASELINE_MODES = ("pipeline", "rectify")


@dataclass
class SamplerSettings:
    """Everything that decides an image besides its prompt and seed (``idgen/conf/sampler/*.yaml``).

    Paths (``controlnet``, ``control_image``, ``image``, each ``extra_guidance[i].model``,
    ``lora[i].path``) are strings, opened only when sampling starts. ``extra_guidance`` entries
    are dicts with the fields of :class:`GuidanceTerm` (``name``, ``model``: a UNet folder, an
    SD1.5 single ``.safetensors`` or null for the frozen SD, ``prompt``, ``weight``, ``start``,
    ``end``, ``reuse_every``) and ``lora``: LoRAs on that term only (its model, or a copy of the
    frozen SD's). ``lora`` entries (``{path: ..., scale: 1.0}``) load into the frozen SD as
    diffusers' ``load_lora_weights`` does: control term and unconditional prediction.
    """

    name: str = "decoupled"
    w_d: float | None = None
    w_c: float | None = None
    w0: float = 7.0
    weights: str = "auto"
    # Active part of the schedule for each term, as [start, end] fractions (beyond the paper):
    # outside it the term drops out of the mix.
    domain_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    control_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Predict the term every k-th step and reuse its direction eps_i - eps_0 in between
    # (beyond the paper: a cost option; 1 = every step).
    domain_reuse_every: int = 1
    control_reuse_every: int = 1
    num_inference_steps: int = 100
    scheduler: str = "dpm++"
    negative_prompt: str | None = None
    controlnet: str | list[str] | None = None
    control_image: str | list[str] | None = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    controlnet_on_uncond: bool = False
    image: str | None = None
    strength: float = 0.8
    extra_guidance: list[dict[str, Any]] = field(default_factory=list)
    # LoRAs on the frozen SD ([{path: <file or folder>, scale: 1.0}]), as load_lora_weights.
    lora: list[dict[str, Any]] = field(default_factory=list)
    # How an exported Table-1 baseline (idgen-sample baseline_model=<folder>) is used:
    # "pipeline": its UNet/text encoder/tokenizer replace SD's (standard CFG with sampler=cfg);
    # "rectify": the frozen SD stays, the baseline's UNet fills extra_guidance[0] (paper §4.5).
    baseline_mode: str = "pipeline"
    required: list[str] = field(default_factory=list)  # dotted fields that must be set

    def check_required(self, provided: Sequence[str] = ()) -> None:
        """Fail early, naming the override, when a field this sampler needs is unset.

        ``provided``: required fields filled from elsewhere (e.g. by ``baseline_model``).
        """
        for dotted in self.required:
            if dotted in provided:
                continue
            value: Any = self
            for part in dotted.split("."):
                if isinstance(value, list | tuple):
                    value = value[int(part)] if int(part) < len(value) else None
                elif isinstance(value, dict):
                    value = value.get(part)
                else:
                    value = getattr(value, part, None)
            if value in (None, "", []):
                raise ValueError(
                    f"sampler '{self.name}' needs sampler.{dotted}; set it on the command line, "
                    f"e.g. sampler.{dotted}=<path>."
                )

    def guidance_terms(self, extra: Sequence[GuidanceTerm] = ()) -> list[GuidanceTerm]:
        """The one list of terms: ``w_d`` (domain), ``w_c`` (control), then ``extra`` (the loaded
        ``extra_guidance`` entries). ``None`` weights are automatic; 0 drops a term."""
        return [
            *decoupled_terms(
                self.w_d,
                self.w_c,
                self.domain_interval,
                self.control_interval,
                self.domain_reuse_every,
                self.control_reuse_every,
            ),
            *extra,
        ]

    def pipeline_kwargs(
        self, terms: Sequence[GuidanceTerm], control_image: Any = None, image: Any = None
    ) -> dict[str, Any]:
        """``InDomainPipeline.__call__`` arguments (all but prompts, generators and size).

        ``terms``: the guidance (usually :meth:`guidance_terms`); ``control_image`` / ``image``:
        the opened ``self.control_image`` / ``self.image``.
        """
        return {
            "guidance": list(terms),
            "w0": self.w0,
            "weights": self.weights,
            "num_inference_steps": self.num_inference_steps,
            "negative_prompt": self.negative_prompt,
            "control_image": control_image,
            "controlnet_conditioning_scale": self.controlnet_conditioning_scale,
            "controlnet_on_uncond": self.controlnet_on_uncond,
            "image": image,
            "strength": self.strength,
        }

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """The prompts: a text file (one per line; blank and ``#`` lines skipped) *replaces* the list.

    ``prompt_file`` wins over ``prompts`` (the config's demo prompts must not leak into a run
    that names its own file).
    """
    out = [str(p) for p in (prompts or [])]
    if prompt_file:
        path = Path(os.path.expanduser(prompt_file))
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt_file '{path}' does not exist; give a text file with one prompt per line "
                "or set prompt_file=null and pass prompts=[...]."
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise ValueError("no prompts: set prompts=[...] or prompt_file=<file>")
    return out
