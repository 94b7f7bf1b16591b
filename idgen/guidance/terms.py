"""One source of guidance: a model, its conditioning, its weight and when it is active."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass
class GuidanceTerm:
    """One extra guidance term ``w (eps_i(z_t, c_i) - eps_sd(z_t, ""))`` for ``InDomainPipeline``.

    Attributes:
        name: key under which the weight is reported in ``guidance_weights`` (default
            ``extra_<i>``, its position in ``extra_guidance``).
        model: ``None`` uses the pipeline's frozen SD UNet (batched with its other predictions);
            a ``UNet2DConditionModel`` (e.g. a community SD1.5 checkpoint) or a text-free model
            called as ``model(latents, t)`` (e.g. another ``NullTextUNet``) gets its own forward.
        prompt: text condition (ignored for text-free models); ``prompt_embeds`` overrides it;
            neither: the pipeline call's own prompt.
        text_encoder: encoder for ``prompt`` if the model has its own (default: the pipeline's).
        weight: a number, or ``"auto"`` for the paper's norm-balanced initial weight.
        start, end: active interval as fractions of the schedule; outside it the term drops out.
        controlnet, control_image, controlnet_conditioning_scale: optional ControlNet on this term.
    """

    name: str = ""
    model: Any = None
    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None
    text_encoder: Any = None
    weight: float | Literal["auto"] = "auto"
    start: float = 0.0
    end: float = 1.0
    controlnet: Any = None
    control_image: Any = None
    controlnet_conditioning_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.weight == "auto" or isinstance(self.weight, int | float)):
            raise ValueError(
                f"GuidanceTerm '{self.name}': weight must be a number or 'auto', got {self.weight!r}"
            )
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"GuidanceTerm '{self.name}': need 0 <= start <= end <= 1, got start={self.start}, "
                f"end={self.end}"
            )
        if (self.controlnet is None) != (self.control_image is None):
            raise ValueError(
                f"GuidanceTerm '{self.name}': controlnet and control_image go together; "
                "give both or neither"
            )
