"""One prompt encoder (idgen.models.text.encode_text) for training, sampling and baselines, equal
to diffusers' ``StableDiffusionPipeline.encode_prompt``, attention mask included."""

from __future__ import annotations

import pytest
import torch

from idgen.models import build_tiny_sd
from idgen.models.family import FAMILIES
from idgen.models.text import encode_text
from idgen.pipelines import InDomainPipeline

PROMPT = "a photo of a red circle"


@pytest.mark.parametrize("use_mask", [False, True])
def test_every_encoder_equals_diffusers(use_mask):
    sd = build_tiny_sd(seed=0)
    sd.text_encoder.config.use_attention_mask = use_mask
    expected = sd.encode_prompt(PROMPT, "cpu", 1, False)[0]
    torch.testing.assert_close(FAMILIES["sd15"].encode_prompt(sd, [PROMPT])[0], expected)
    pipe = InDomainPipeline.from_sd(sd)
    torch.testing.assert_close(pipe.encode_text([PROMPT], torch.device("cpu")), expected)


def test_the_mask_is_honoured():
    """With ``use_attention_mask`` the padding positions attend to the prompt only: they change."""
    sd = build_tiny_sd(seed=0)
    with torch.no_grad():
        plain = encode_text(sd.tokenizer, sd.text_encoder, [PROMPT])
        sd.text_encoder.config.use_attention_mask = True
        masked = encode_text(sd.tokenizer, sd.text_encoder, [PROMPT])
    n = len(sd.tokenizer(PROMPT).input_ids)  # the prompt's own tokens (BOS ... EOS)
    torch.testing.assert_close(masked[:, :n], plain[:, :n])  # causal: they never saw the pads
    assert not torch.allclose(masked[:, n:], plain[:, n:])


def test_gradients_reach_the_text_encoder():
    """Textual inversion learns through the same encoder: it must not detach."""
    sd = build_tiny_sd(seed=0)
    encode_text(sd.tokenizer, sd.text_encoder, [PROMPT]).sum().backward()
    assert sd.text_encoder.get_input_embeddings().weight.grad is not None
