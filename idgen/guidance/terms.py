"""One source of guidance: a model, its conditioning, its weight and when it is active."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

# ``GuidanceTerm.model`` given as a string names a component of the pipeline that runs the term;
# "domain_unet" is the null-text domain model (the paper's eps_d).
DOMAIN_UNET = "domain_unet"


@dataclass
class GuidanceTerm:
    """One guidance term ``w (eps_i(z_t, c_i) - eps_sd(z_t, ""))`` of paper Eq. 3.

    ``w_d`` and ``w_c`` are two of these (:func:`idgen.guidance.decoupled_terms`); ControlNet,
    community checkpoints and rectified baselines are terms too.

    Attributes:
        name: key under which the weight is reported in ``guidance_weights`` (default
            ``extra_<i>``, its position in the list).
        model: ``None`` uses the pipeline's frozen SD UNet (batched with its other predictions);
            a string names a pipeline component (``"domain_unet"``: the domain model); a
            ``UNet2DConditionModel`` (e.g. a community SD1.5 checkpoint) or a text-free model
            called as ``model(latents, t)`` (e.g. another ``NullTextUNet``) gets its own forward.
        prompt: text condition (ignored for text-free models); ``prompt_embeds`` overrides it;
            neither: the pipeline call's own prompt.
        text_encoder: encoder for ``prompt`` if the model has its own (default: the pipeline's).
        weight: a number, or ``"auto"`` for the paper's norm-balanced initial weight (set at the
            term's first active step, then held).
        start, end: active interval as fractions of the schedule; outside it the term drops out.
        reuse_every: ``k``: predict this term every ``k``-th active step and reuse its guidance
            direction ``eps_i - eps_0`` in between (``1``: predict every step; beyond the paper,
            a cost option).
        controlnet, control_image, controlnet_conditioning_scale: optional ControlNet on this term
            (one net or a ``MultiControlNetModel`` with a list of images and scales).
    """

    name: str = ""
    model: Any = None
    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None
    text_encoder: Any = None
    weight: float | Literal["auto"] = "auto"
    start: float = 0.0
    end: float = 1.0
    reuse_every: int = 1
    controlnet: Any = None
    control_image: Any = None
    controlnet_conditioning_scale: float | list[float] = 1.0

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
        if not isinstance(self.reuse_every, int) or self.reuse_every < 1:
            raise ValueError(
                f"GuidanceTerm '{self.name}': reuse_every must be an integer >= 1 (1 = predict "
                f"every step), got {self.reuse_every!r}"
            )
        if (self.controlnet is None) != (self.control_image is None):
            raise ValueError(
                f"GuidanceTerm '{self.name}': controlnet and control_image go together; "
                "give both or neither"
            )

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (for PNG metadata and parameter hashes): no tensors or models."""
        model = self.model if self.model is None or isinstance(self.model, str) else None
        if model is None and self.model is not None:
            model = type(self.model).__name__
        return {
            "name": self.name,
            "model": model,
            "prompt": self.prompt,
            "weight": self.weight,
            "start": self.start,
            "end": self.end,
            "reuse_every": self.reuse_every,
            "controlnet": None if self.controlnet is None else type(self.controlnet).__name__,
            "controlnet_conditioning_scale": self.controlnet_conditioning_scale,
        }
