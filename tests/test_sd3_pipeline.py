"""InDomainSD3Pipeline: decoupled guidance in velocity space, equal to diffusers' SD3 pipelines
at w_d = 0 (flow-matching Euler with shift, without shift, with dynamic shifting; img2img)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline

from idgen.guidance import DOMAIN, GuidanceTerm
from idgen.models import FAMILIES, NullTextSD3Transformer, build_tiny_sd3
from idgen.pipelines.in_domain_sd3 import InDomainSD3Pipeline

PROMPT = "a red circle"
STEPS = 4


def _gen():
    return torch.Generator().manual_seed(0)


def _ours(sd, **kw):
    pipe = InDomainSD3Pipeline.from_pipe(sd, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd3(seed=0)


@pytest.mark.parametrize(
    "scheduler",
    [dict(shift=3.0), dict(shift=1.0), dict(use_dynamic_shifting=True), dict(t5=True)],
    ids=["shift3", "no_shift", "dynamic_shifting", "with_t5"],
)
def test_parity_with_stable_diffusion_3_at_w_d_0(scheduler):
    base = build_tiny_sd3(seed=0, **scheduler)
    ref = base(
        PROMPT, num_inference_steps=STEPS, guidance_scale=4.5, generator=_gen(), output_type="np"
    ).images
    out = _ours(base)(
        PROMPT,
        w_d=0,
        w_c=4.5,
        weights="fixed",
        num_inference_steps=STEPS,
        generator=_gen(),
        output_type="np",
    )
    assert np.abs(out.images - ref).max() < 2e-3
    assert out.guidance_weights["control"].tolist() == [4.5]
    # diffusers' own argument name gives the same images
    alias = _ours(base)(
        PROMPT,
        w_d=0,
        guidance_scale=4.5,
        weights="fixed",
        num_inference_steps=STEPS,
        generator=_gen(),
        output_type="np",
    ).images
    assert np.abs(alias - ref).max() < 2e-3


def test_parity_negative_prompt_and_batch(sd):
    prompts = ["a red circle", "a blue square"]
    kw = dict(negative_prompt=["dark", "green"], num_images_per_prompt=2, output_type="np")
    ref = sd(prompts, num_inference_steps=STEPS, guidance_scale=3.0, generator=_gen(), **kw)
    out = _ours(sd)(
        prompts, w_d=0, w_c=3.0, weights="fixed", num_inference_steps=STEPS, generator=_gen(), **kw
    )
    assert out.images.shape == ref.images.shape == (4, 64, 64, 3)
    assert np.abs(out.images - ref.images).max() < 2e-3


def test_img2img_parity_with_stable_diffusion_3_img2img(sd):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref_pipe = StableDiffusion3Img2ImgPipeline.from_pipe(sd)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(image=image, strength=0.6, num_inference_steps=STEPS, output_type="np")
    ref = ref_pipe(PROMPT, guidance_scale=3.0, generator=_gen(), **kw).images
    out = _ours(sd)(PROMPT, w_d=0, w_c=3.0, weights="fixed", generator=_gen(), **kw).images
    assert np.abs(out - ref).max() < 2e-3
    # and it is img2img: not the text-to-image result
    t2i = _ours(sd)(
        PROMPT,
        w_d=0,
        w_c=3.0,
        weights="fixed",
        num_inference_steps=STEPS,
        generator=_gen(),
        output_type="np",
    ).images
    assert np.abs(out - t2i).max() > 1e-2


@pytest.fixture(scope="module")
def prompt_domain(sd):
    """A domain transformer whose learned context is the prompt's own encoding: at init it
    predicts v_sd(z, PROMPT) without any text input."""
    embeds, pooled = FAMILIES["sd3"].encode_prompt(sd, [PROMPT])
    return NullTextSD3Transformer.from_transformer(sd.transformer, embeds, pooled)


def test_domain_term_alone_is_cfg_on_its_context(sd, prompt_domain):
    """v_sd(z,"") + w_d (v_d - v_sd(z,"")) with v_d = v_sd(z, PROMPT) is CFG on PROMPT: the
    domain model's velocity goes into the same formula as the control term's."""
    ref = sd(
        PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, generator=_gen(), output_type="np"
    ).images
    out = _ours(sd, domain_transformer=prompt_domain)(
        "",
        w_d=4.0,
        w_c=0,
        weights="fixed",
        num_inference_steps=STEPS,
        generator=_gen(),
        output_type="np",
    )
    assert np.abs(out.images - ref).max() < 2e-3
    assert out.guidance_weights[DOMAIN].tolist() == [4.0]
    assert "control" not in out.guidance_weights


def test_auto_weights_balance_velocity_norms(sd, prompt_domain):
    """weights='auto': w_i = w0 / K * |v_sd(z,"")| / |v_i| per sample at the first step (the
    paper's rule on velocities), read back from the step-0 predictions."""
    seen = {}

    def grab(pipe, i, t, kw):
        if i == 0:
            seen.update(
                v0=kw["eps_uncond"].clone(),
                preds={k: v.clone() for k, v in kw["guidance_preds"].items()},
            )
        return {}

    out = _ours(sd, domain_transformer=prompt_domain)(
        "a blue square",
        num_inference_steps=STEPS,
        generator=_gen(),
        output_type="np",
        w0=6.0,
        callback_on_step_end=grab,
        callback_on_step_end_tensor_inputs=["eps_uncond", "guidance_preds"],
    )
    norm = lambda v: v.float().flatten(1).norm(dim=1)  # noqa: E731
    for name in ("domain", "control"):
        expected = 6.0 / 2 * norm(seen["v0"]) / norm(seen["preds"][name])
        assert torch.allclose(out.guidance_weights[name], expected, rtol=1e-5)


def test_guidance_list_and_intervals(sd, prompt_domain):
    """The same GuidanceTerm list as SD1.5: a domain term active only in the first half changes
    the image, but less than one active throughout."""
    pipe = _ours(sd, domain_transformer=prompt_domain)
    common = dict(num_inference_steps=STEPS, output_type="np", weights="fixed")
    plain = pipe("a blue square", w_d=0, w_c=3.0, generator=_gen(), **common).images
    half = pipe(
        "a blue square",
        guidance=[
            GuidanceTerm("control", None, weight=3.0),
            GuidanceTerm("domain", "domain_unet", weight=3.0, end=0.5),
        ],
        generator=_gen(),
        **common,
    ).images
    full = pipe("a blue square", w_d=3.0, w_c=3.0, generator=_gen(), **common).images
    assert 0 < np.abs(half - plain).max() < np.abs(full - plain).max()


def test_bad_calls(sd):
    pipe = _ours(sd)
    with pytest.raises(ValueError, match="no domain_transformer"):
        pipe(PROMPT, w_d=2.0, w_c=3.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="weights='fixed' needs a number"):
        pipe(PROMPT, w_d=0, weights="fixed", num_inference_steps=2)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(PROMPT, w_d=0, w_c=3.0, height=40, width=64, num_inference_steps=2)
