"""The one prompt encoder: CLIP features as diffusers' ``StableDiffusionPipeline`` makes them."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def encode_text(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    texts: Sequence[str],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Text-encoder features ``[len(texts), model_max_length, D]`` of ``texts``.

    As diffusers' ``StableDiffusionPipeline.encode_prompt``: padded to the tokenizer's maximum
    length, truncated, and with the attention mask only when the encoder's config asks for it
    (``use_attention_mask``). Gradients flow (textual inversion learns through it); wrap frozen
    use in ``torch.no_grad()``. The output keeps the encoder's dtype.
    """
    device = device if device is not None else text_encoder.device
    inputs = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(device)
    return text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]


def accepts_text(model: Any) -> bool:
    """Whether ``model`` is called with ``encoder_hidden_states`` (a text-conditioned UNet),
    as opposed to a text-free one called as ``model(latents, t)`` (``NullTextUNet``)."""
    return "encoder_hidden_states" in inspect.signature(model.forward).parameters
