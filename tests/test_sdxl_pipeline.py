"""InDomainXLPipeline against diffusers' SDXL pipelines: at w_d = 0, w_c = g, weights="fixed" it
is StableDiffusionXLPipeline(guidance_scale=g) (and StableDiffusionXLImg2ImgPipeline for SDEdit);
with a domain model the mix is Eq. 3 over predictions that get SDXL's time_ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from idgen.guidance import CONTROL, DOMAIN
from idgen.models import FAMILIES, NullTextUNet, build_tiny_sdxl
from idgen.pipelines import InDomainXLPipeline, decoupled_pipeline_class, make_scheduler

SCHEDULERS = [
    "dpm++",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DDIMScheduler",
    "UniPCMultistepScheduler",
]
PROMPTS = ["a photo of a cat", "a red circle"]
TOL = 2e-3  # max abs pixel difference (fp32), the bar


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl(seed=0)


def _gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _reference(sdxl, scheduler: str) -> StableDiffusionXLPipeline:
    ref = StableDiffusionXLPipeline(
        **{**sdxl.components, "scheduler": make_scheduler(sdxl.scheduler.config, scheduler)}
    )
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_w_d_zero_equals_diffusers_sdxl(sdxl, scheduler):
    ref = _reference(sdxl, scheduler)
    ours = InDomainXLPipeline.from_sd(
        sdxl, scheduler=make_scheduler(sdxl.scheduler.config, scheduler)
    )
    kw = dict(num_inference_steps=5, output_type="np")
    expected = ref(PROMPTS, guidance_scale=5.0, generator=_gens(2), **kw).images
    got = ours(PROMPTS, w_d=0, w_c=5.0, weights="fixed", generator=_gens(2), **kw).images
    assert np.abs(got - expected).max() < TOL
    # not vacuous: another guidance scale gives other images
    other = ref(PROMPTS, guidance_scale=2.0, generator=_gens(2), **kw).images
    assert np.abs(other - expected).max() > 20 * TOL


def test_negative_prompt_and_guidance_rescale_equal_diffusers(sdxl):
    ref = _reference(sdxl, "dpm++")
    ours = InDomainXLPipeline.from_pipe(sdxl, scheduler=ref.scheduler)
    kw = dict(num_inference_steps=5, output_type="np", negative_prompt="dark", guidance_rescale=0.7)
    expected = ref("a cat", guidance_scale=4.0, generator=_gens(1), **kw).images
    got = ours("a cat", w_d=0, w_c=4.0, weights="fixed", generator=_gens(1), **kw).images
    assert np.abs(got - expected).max() < TOL
    plain = ref(
        "a cat", guidance_scale=4.0, generator=_gens(1), num_inference_steps=5, output_type="np"
    )
    assert np.abs(plain.images - expected).max() > 20 * TOL  # the negative prompt mattered


def test_sdedit_equals_diffusers_sdxl_img2img(sdxl):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    sched = make_scheduler(sdxl.scheduler.config, "dpm++")
    ref = StableDiffusionXLImg2ImgPipeline(
        **{**sdxl.components, "scheduler": sched}, requires_aesthetics_score=False
    )
    ref.set_progress_bar_config(disable=True)
    ours = InDomainXLPipeline.from_sd(sdxl, scheduler=make_scheduler(sched.config, "dpm++"))
    kw = dict(image=image, strength=0.6, num_inference_steps=10, output_type="np")
    expected = ref("a cat", guidance_scale=4.0, generator=_gens(1), **kw).images
    got = ours("a cat", w_d=0, w_c=4.0, weights="fixed", generator=_gens(1), **kw).images
    assert np.abs(got - expected).max() < TOL


def test_domain_term_mixes_eq3_with_sdxl_time_ids(sdxl):
    embeds, pooled = FAMILIES["sdxl"].encode_prompt(sdxl, ["a photo of cat"])
    domain = NullTextUNet.from_unet(sdxl.unet, embeds, pooled_features=pooled)
    pipe = InDomainXLPipeline.from_sd(sdxl, domain_unet=domain, scheduler="EulerDiscreteScheduler")
    seen = []
    domain.register_forward_pre_hook(lambda m, a, k: seen.append(k["time_ids"]), with_kwargs=True)
    checks = []

    def check(p, i, t, kw):
        eps0, preds = kw["eps_uncond"], kw["guidance_preds"]
        mix = eps0 + 1.5 * (preds[DOMAIN] - eps0) + 3.0 * (preds[CONTROL] - eps0)
        checks.append(float((kw["noise_pred"] - mix).abs().max()))
        return {}

    out = pipe(
        "a cat",
        w_d=1.5,
        w_c=3.0,
        weights="fixed",
        num_inference_steps=3,
        original_size=(128, 96),
        crops_coords_top_left=(4, 8),
        generator=_gens(1),
        output_type="np",
        callback_on_step_end=check,
        callback_on_step_end_tensor_inputs=["noise_pred", "eps_uncond", "guidance_preds"],
    )
    assert len(checks) == 3 and max(checks) < 1e-5
    assert [ids.tolist() for ids in seen] == [[[128.0, 96.0, 4.0, 8.0, 64.0, 64.0]]] * 3
    assert set(out.guidance_weights) == {DOMAIN, CONTROL}
    # automatic weights run too (w0/2 * |eps_sd| / |eps_i|, held)
    auto = pipe("a cat", num_inference_steps=2, generator=_gens(1), output_type="np")
    assert all(torch.isfinite(w).all() and (w > 0).all() for w in auto.guidance_weights.values())


def test_family_picks_the_pipeline_and_bad_calls_fail_early(sdxl):
    assert decoupled_pipeline_class(FAMILIES["sdxl"]) is InDomainXLPipeline
    pipe = InDomainXLPipeline.from_sd(sdxl)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(1, 77, 64), w_d=0, w_c=2.0, weights="fixed")
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("a cat", height=60, w_d=0, w_c=2.0, weights="fixed")
    with pytest.raises(ValueError, match="no controlnet"):
        pipe("a cat", control_image=Image.new("RGB", (64, 64)), w_d=0, w_c=2.0)
    with pytest.raises(ValueError, match="domain_unet"):
        pipe("a cat", w_d=1.0, w_c=2.0, weights="fixed")


def _tiny_xl_controlnet(unet):
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        for module in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.1)  # from_unet zero-initialises them
    return cn


def test_controlnet_equals_diffusers_sdxl_controlnet_pipeline(sdxl):
    from diffusers import StableDiffusionXLControlNetPipeline

    cn = _tiny_xl_controlnet(sdxl.unet)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ref = StableDiffusionXLControlNetPipeline(**sdxl.components, controlnet=cn)
    ref.scheduler = make_scheduler(sdxl.scheduler.config, "dpm++")
    ref.set_progress_bar_config(disable=True)
    ours = InDomainXLPipeline.from_sd(sdxl, controlnet=cn)
    kw = dict(num_inference_steps=5, output_type="np", controlnet_conditioning_scale=0.8)
    expected = ref(PROMPTS, image=image, guidance_scale=4.0, generator=_gens(2), **kw).images
    # diffusers feeds the ControlNet to the unconditional branch too: controlnet_on_uncond
    got = ours(
        PROMPTS,
        control_image=image,
        controlnet_on_uncond=True,
        w_d=0,
        w_c=4.0,
        weights="fixed",
        generator=_gens(2),
        **kw,
    ).images
    assert np.abs(got - expected).max() < TOL
    plain = ours(
        PROMPTS, w_d=0, w_c=4.0, weights="fixed", generator=_gens(2), num_inference_steps=5
    )
    assert np.abs(np.asarray(plain.images[0]) / 255 - expected[0]).max() > 20 * TOL

    # the paper's way (default): the ControlNet on the control term only, eps_sd(z, "") plain
    seen = {}

    def grab(key):
        def callback(p, i, t, kw):
            if i == 0:
                seen[key] = (kw["eps_uncond"].clone(), kw["guidance_preds"][CONTROL].clone())
            return {}

        return callback

    names = ["eps_uncond", "guidance_preds"]
    common = dict(w_d=0, w_c=4.0, weights="fixed", num_inference_steps=2, output_type="np")
    ours(PROMPTS, generator=_gens(2), callback_on_step_end=grab("none"),
         callback_on_step_end_tensor_inputs=names, **common)  # fmt: skip
    ours(PROMPTS, control_image=image, generator=_gens(2), callback_on_step_end=grab("paper"),
         callback_on_step_end_tensor_inputs=names, **common)  # fmt: skip
    torch.testing.assert_close(seen["paper"][0], seen["none"][0])  # the uncond is untouched
    assert (seen["paper"][1] - seen["none"][1]).abs().max() > 1e-3  # the control term is not
