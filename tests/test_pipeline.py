"""InDomainPipeline against diffusers' own pipelines on the tiny SD, same seed and scheduler."""

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from idgen.guidance import auto_weight
from idgen.models import build_tiny_sd
from idgen.models.null_text_unet import NullTextUNet
from idgen.pipelines import GuidanceTerm, InDomainPipeline
from tests.conftest import tiny_controlnet

STEPS = 4
PROMPT = "a photo of a red circle"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dpm(sd):
    return DPMSolverMultistepScheduler.from_config(sd.scheduler.config)


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd(seed=0)


@pytest.fixture(scope="module")
def domain(sd):
    ids = sd.tokenizer(["a photo of a shape"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        features = sd.text_encoder(ids)[0]
    return NullTextUNet.from_unet(sd.unet, features, init="value")


@pytest.fixture(scope="module")
def controlnet(sd):
    return tiny_controlnet(sd.unet, seed=1)


@pytest.fixture(scope="module")
def control_image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


def _latents(pipe, **kwargs):
    kwargs.setdefault("generator", _gen())
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(output_type="latent", **kwargs).images


def test_w_d_zero_equals_diffusers_cfg(sd, domain):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    ref = StableDiffusionPipeline(**{**sd.components, "scheduler": _dpm(sd)})
    ref.set_progress_bar_config(disable=True)
    for g in (1.0, 7.5):
        ours = _latents(pipe, prompt=PROMPT, w_d=0.0, w_c=g, num_images_per_prompt=2)
        theirs = _latents(ref, prompt=PROMPT, guidance_scale=g, num_images_per_prompt=2)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # negative_prompt replaces the empty unconditional prompt, as in diffusers
    ours = _latents(pipe, prompt=PROMPT, negative_prompt="a dark background", w_d=0, w_c=4.0)
    theirs = _latents(ref, prompt=PROMPT, negative_prompt="a dark background", guidance_scale=4.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_images_match_diffusers_cfg(sd):
    pipe = InDomainPipeline.from_sd(sd)
    ref = StableDiffusionPipeline(**{**sd.components, "scheduler": _dpm(sd)})
    ref.set_progress_bar_config(disable=True)
    ours = pipe(PROMPT, w_c=3.0, num_inference_steps=STEPS, generator=_gen(3), output_type="np")
    theirs = ref(
        PROMPT, guidance_scale=3.0, num_inference_steps=STEPS, generator=_gen(3), output_type="np"
    )
    np.testing.assert_allclose(ours.images, theirs.images, atol=1e-5)


def test_controlnet_on_uncond_equals_diffusers_controlnet(sd, controlnet, control_image):
    pipe = InDomainPipeline.from_sd(sd, controlnet=controlnet)
    ref = StableDiffusionControlNetPipeline(
        **{k: v for k, v in sd.components.items() if k != "image_encoder"},
        controlnet=controlnet,
    )
    ref.scheduler = _dpm(sd)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, height=64, width=64, controlnet_conditioning_scale=0.7)
    ours = _latents(pipe, w_c=5.0, control_image=control_image, controlnet_on_uncond=True, **kw)
    theirs = _latents(ref, guidance_scale=5.0, image=control_image, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the ControlNet really acts, and the paper's default (control term only) differs again
    plain = _latents(pipe, w_c=5.0, prompt=PROMPT)
    paper = _latents(pipe, w_c=5.0, control_image=control_image, **kw)
    assert (ours - plain).abs().max() > 1e-3
    assert (ours - paper).abs().max() > 1e-3


def test_sdedit_equals_diffusers_img2img(sd):
    pipe = InDomainPipeline.from_sd(sd)
    ref = StableDiffusionImg2ImgPipeline(**{**sd.components, "scheduler": _dpm(sd)})
    ref.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    init = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    for strength in (0.5, 0.8):
        ours = _latents(
            pipe, prompt=PROMPT, w_c=6.0, image=init, strength=strength, num_inference_steps=STEPS
        )
        theirs = _latents(
            ref,
            prompt=PROMPT,
            guidance_scale=6.0,
            image=init,
            strength=strength,
            num_inference_steps=STEPS,
        )
        # Same ops in the same order: expected equal up to float rounding.
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_prompt_has_no_effect_when_w_c_is_zero(sd, domain):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    a = _latents(pipe, prompt="a photo of a red circle", w_d=3.0, w_c=0.0)
    b = _latents(pipe, prompt="a blue square with glasses", w_d=3.0, w_c=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = _latents(pipe, prompt="a blue square with glasses", w_d=3.0, w_c=2.0)
    assert (a - c).abs().max() > 1e-4


def _count_calls(module, store, key):
    def hook(_m, args, _out):
        store.setdefault(key, []).append(args[0].shape[0])

    return module.register_forward_hook(hook)


def test_decoupled_step_matches_three_term_formula(sd, domain):
    """One step by hand: (1 - w_d - w_c) eps_sd("") + w_d eps_d + w_c eps_c, then the scheduler."""
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    calls: dict = {}
    handles = [_count_calls(sd.unet, calls, "unet"), _count_calls(domain, calls, "domain")]
    try:
        ours = _latents(
            pipe, prompt=PROMPT, w_d=2.0, w_c=3.0, num_inference_steps=1, num_images_per_prompt=2
        )
    finally:
        for h in handles:
            h.remove()
    # one batched SD forward (uncond + cond) and one domain forward, nothing twice
    assert calls == {"unet": [4], "domain": [2]}

    sched = _dpm(sd)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    z = torch.randn(2, 4, 8, 8, generator=_gen()) * sched.init_noise_sigma
    emb = pipe.encode_text([PROMPT, ""], torch.device("cpu"))
    with torch.no_grad():
        eps_c = sd.unet(z, t, encoder_hidden_states=emb[:1].expand(2, -1, -1)).sample
        eps_u = sd.unet(z, t, encoder_hidden_states=emb[1:].expand(2, -1, -1)).sample
        eps_d = domain(z, t).sample
    eps = (1 - 2.0 - 3.0) * eps_u + 2.0 * eps_d + 3.0 * eps_c
    expected = sched.step(eps, t, z).prev_sample
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_auto_weights_match_formula_on_recorded_norms(sd, domain):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    recorded: dict = {}

    def rec(name):
        def hook(_m, _a, out):
            recorded.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out.sample)

        return hook

    handles = [
        sd.unet.register_forward_hook(rec("unet")),
        domain.register_forward_hook(rec("domain")),
    ]
    try:
        out = pipe(
            PROMPT,
            num_inference_steps=3,
            generator=_gen(),
            num_images_per_prompt=2,
            output_type="latent",
        )
    finally:
        for h in handles:
            h.remove()
    eps_u, eps_c = recorded["unet"][0].chunk(2)
    eps_d = recorded["domain"][0]
    for name, eps_i in (("domain", eps_d), ("control", eps_c)):
        expected = [3.5 * eps_u[b].norm() / eps_i[b].norm() for b in range(2)]
        torch.testing.assert_close(
            out.guidance_weights[name], torch.stack(expected), rtol=1e-5, atol=0
        )
    # held after the first step: the weights differ from what the last step's norms would give
    last_u, last_c = recorded["unet"][-1].chunk(2)
    assert not torch.allclose(auto_weight(last_u, last_c), out.guidance_weights["control"])


def test_fixed_weights_require_numbers(sd, domain):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    with pytest.raises(ValueError, match="fixed.*w_d"):
        pipe(PROMPT, w_c=2.0, weights="fixed", num_inference_steps=1)
    with pytest.raises(ValueError, match="no domain_unet"):
        InDomainPipeline.from_sd(sd)(PROMPT, w_d=2.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="no controlnet"):
        InDomainPipeline.from_sd(sd)(
            PROMPT, w_c=2.0, control_image=Image.new("RGB", (64, 64)), num_inference_steps=1
        )


def test_community_unet_rectification_equals_cfg_with_same_weights(sd):
    """Rectification: a community model's cond prediction + frozen SD's uncond. With a copy of
    SD's UNet as the 'community' model this must be plain CFG."""
    community = copy.deepcopy(sd.unet)
    pipe = InDomainPipeline.from_sd(sd)
    ref = StableDiffusionPipeline(**{**sd.components, "scheduler": _dpm(sd)})
    ref.set_progress_bar_config(disable=True)
    term = GuidanceTerm(name="style", model=community, prompt=PROMPT, weight=4.0)
    calls: dict = {}
    handles = [_count_calls(sd.unet, calls, "sd"), _count_calls(community, calls, "community")]
    try:
        ours = _latents(pipe, prompt=PROMPT, w_c=0.0, extra_guidance=[term])
    finally:
        for h in handles:
            h.remove()
    assert calls == {"sd": [1] * STEPS, "community": [1] * STEPS}
    theirs = _latents(ref, prompt=PROMPT, guidance_scale=4.0)
    # Two batch-1 forwards vs one batch-2 forward: equal up to float32 rounding over a few steps.
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # a genuinely different community model changes the result
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        other = build_tiny_sd(seed=5).unet
    term2 = GuidanceTerm(name="style", model=other, prompt=PROMPT, weight=4.0)
    assert (
        _latents(pipe, prompt=PROMPT, w_c=0.0, extra_guidance=[term2]) - ours
    ).abs().max() > 1e-3


def test_several_terms_and_intervals(sd, domain, controlnet, control_image):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain, controlnet=controlnet)
    base = _latents(pipe, prompt=PROMPT, w_d=2.0, w_c=2.0)
    # a term whose interval is empty drops out entirely
    off = GuidanceTerm(name="glasses", prompt="wearing glasses", weight=3.0, start=0.0, end=0.0)
    torch.testing.assert_close(
        _latents(pipe, prompt=PROMPT, w_d=2.0, w_c=2.0, extra_guidance=[off]), base
    )
    # complex conditions: domain + prompt + ControlNet + SD text term + community model at once
    calls: dict = {}
    handles = [_count_calls(sd.unet, calls, "sd"), _count_calls(domain, calls, "domain")]
    terms = [
        GuidanceTerm(name="glasses", prompt="wearing glasses", weight=1.5, start=0.0, end=0.5),
        GuidanceTerm(
            name="style", model=build_tiny_sd(seed=7).unet, prompt="a painting", weight="auto"
        ),
    ]
    try:
        out = pipe(
            PROMPT,
            w_d=2.0,
            w_c=2.0,
            control_image=control_image,
            extra_guidance=terms,
            num_inference_steps=STEPS,
            generator=_gen(),
            output_type="pt",
        )
    finally:
        for h in handles:
            h.remove()
    # SD: uncond + control + glasses in one forward while glasses is active (first half of the steps)
    assert calls["sd"] == [3] * (STEPS // 2) + [2] * (STEPS // 2)
    assert calls["domain"] == [1] * STEPS
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    assert set(out.guidance_weights) == {"domain", "control", "glasses", "style"}
    assert out.guidance_weights["glasses"].tolist() == [1.5]


def test_save_pretrained_round_trip(sd, domain, tmp_path):
    pipe = InDomainPipeline.from_sd(sd, domain_unet=domain)
    before = _latents(pipe, prompt=PROMPT, w_d=2.0, w_c=3.0)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = InDomainPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.domain_unet, NullTextUNet)
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "domain_unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # Same weights; CPU kernels may round differently for freshly loaded (eval-mode) modules.
    after = _latents(loaded, prompt=PROMPT, w_d=2.0, w_c=3.0)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # without a domain model the optional component saves and loads as None
    InDomainPipeline.from_sd(sd).save_pretrained(tmp_path / "plain")
    assert InDomainPipeline.from_pretrained(tmp_path / "plain").domain_unet is None


def test_multi_controlnet_on_uncond_equals_diffusers(sd, controlnet, control_image):
    second = tiny_controlnet(sd.unet, seed=2)
    nets, images, scales = (
        [controlnet, second],
        [control_image, control_image.rotate(90)],
        [0.5, 0.8],
    )
    pipe = InDomainPipeline.from_sd(sd, controlnet=nets)
    ref = StableDiffusionControlNetPipeline(
        **{k: v for k, v in sd.components.items() if k != "image_encoder"}, controlnet=nets
    )
    ref.scheduler = _dpm(sd)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, height=64, width=64, controlnet_conditioning_scale=scales)
    ours = _latents(pipe, w_c=5.0, control_image=images, controlnet_on_uncond=True, **kw)
    theirs = _latents(ref, guidance_scale=5.0, image=images, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_controlnet_only_in_control_term_by_default(sd, controlnet, control_image):
    """Paper default: eps_sd(z, "") plain, ControlNet residuals only in the prompt prediction."""
    pipe = InDomainPipeline.from_sd(sd, controlnet=controlnet)
    ours = _latents(
        pipe, prompt=PROMPT, w_c=4.0, control_image=control_image, num_inference_steps=1
    )
    sched = _dpm(sd)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    z = torch.randn(1, 4, 8, 8, generator=_gen()) * sched.init_noise_sigma
    emb = pipe.encode_text([PROMPT, ""], torch.device("cpu"))
    cond = pipe.control_image_processor.preprocess(control_image, height=64, width=64)
    with torch.no_grad():
        down, mid = controlnet(
            z, t, encoder_hidden_states=emb[:1], controlnet_cond=cond, return_dict=False
        )
        eps_c = sd.unet(
            z,
            t,
            encoder_hidden_states=emb[:1],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        eps_u = sd.unet(z, t, encoder_hidden_states=emb[1:]).sample
    expected = sched.step(eps_u + 4.0 * (eps_c - eps_u), t, z).prev_sample
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_half_precision_frozen_models_run(sd, domain):
    """The memory option: frozen models in bfloat16 (what fp16/bf16 on a GPU does)."""
    pipe = InDomainPipeline.from_sd(copy.deepcopy(sd), domain_unet=copy.deepcopy(domain))
    pipe.to(dtype=torch.bfloat16)
    out = pipe(PROMPT, w_d=2.0, w_c=3.0, num_inference_steps=2, generator=_gen(), output_type="pt")
    assert pipe.unet.dtype == pipe.domain_unet.dtype == torch.bfloat16
    assert torch.isfinite(out.images.float()).all()


def test_term_with_own_text_encoder_encodes_the_call_prompt(sd):
    other = build_tiny_sd(seed=9)
    pipe = InDomainPipeline.from_sd(sd)
    own = GuidanceTerm(name="c", model=other.unet, text_encoder=other.text_encoder, weight=3.0)
    embeds = pipe.encode_text([PROMPT], torch.device("cpu"), other.text_encoder)
    given = GuidanceTerm(name="c", model=other.unet, prompt_embeds=embeds, weight=3.0)
    a = _latents(pipe, prompt=PROMPT, w_c=0.0, extra_guidance=[own], num_inference_steps=2)
    b = _latents(pipe, prompt=PROMPT, w_c=0.0, extra_guidance=[given], num_inference_steps=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the pipeline's own encoder would give something else
    shared = GuidanceTerm(name="c", model=other.unet, weight=3.0)
    c = _latents(pipe, prompt=PROMPT, w_c=0.0, extra_guidance=[shared], num_inference_steps=2)
    assert (a - c).abs().max() > 1e-5
