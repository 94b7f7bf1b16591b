"""InDomainPipeline at w_d = 0 against diffusers' own pipelines for several schedulers, and the
diffusers conveniences (scheduler-config corrections, VAE slicing/tiling, from_pipe, loading)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from idgen.models import NullTextUNet, build_tiny_sd
from idgen.pipelines import InDomainPipeline, fix_scheduler_config
from tests.conftest import tiny_controlnet

STEPS = 4
PROMPT = "a photo of a red circle"


def _old_config(sd) -> dict:
    """SD1.x scheduler config as early checkpoints saved it: no clip_sample, steps_offset 0."""
    config = {k: v for k, v in sd.scheduler.config.items() if k != "clip_sample"}
    return {**config, "steps_offset": 0}


SCHEDULERS = {
    "dpm++": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
    "ddim_old_config": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "pndm": lambda c: PNDMScheduler.from_config(c),
}


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd(seed=0)


@pytest.fixture(scope="module")
def controlnet(sd):
    return tiny_controlnet(sd.unet, seed=1)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


def _parts(sd) -> dict:
    return {k: v for k, v in sd.components.items() if k not in ("scheduler", "image_encoder")}


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "controlnet"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_w_d_zero_equals_diffusers(sd, controlnet, name, mode):
    make = SCHEDULERS[name]
    config = _old_config(sd)
    # Each pipeline gets its own scheduler instance (schedulers are stateful).
    kw = dict(num_inference_steps=STEPS, output_type="latent", prompt=PROMPT)
    if mode == "txt2img":
        ref = StableDiffusionPipeline(**_parts(sd), scheduler=make(config))
        ours = InDomainPipeline.from_sd(sd, scheduler=make(config))
        extra, ref_extra = {}, {}
    elif mode == "img2img":
        ref = StableDiffusionImg2ImgPipeline(**_parts(sd), scheduler=make(config))
        ours = InDomainPipeline.from_sd(sd, scheduler=make(config))
        extra = ref_extra = {"image": _image(1), "strength": 0.75}
    else:
        # diffusers' ControlNet pipeline does not correct old configs itself (users get corrected
        # ones from StableDiffusionPipeline): give it the corrected config.
        ref = StableDiffusionControlNetPipeline(
            **_parts(sd), controlnet=controlnet, scheduler=fix_scheduler_config(make(config))
        )
        ours = InDomainPipeline.from_sd(sd, controlnet=controlnet, scheduler=make(config))
        extra = {"control_image": _image(2), "controlnet_on_uncond": True}
        ref_extra = {"image": _image(2)}
    ref.set_progress_bar_config(disable=True)
    assert ours.scheduler.config.steps_offset == ref.scheduler.config.steps_offset == 1
    theirs = ref(guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **kw, **ref_extra)
    mine = ours(w_d=0.0, w_c=5.0, generator=torch.Generator().manual_seed(0), **kw, **extra)
    torch.testing.assert_close(mine.images, theirs.images, rtol=1e-5, atol=1e-5)


def test_ddim_without_the_config_correction_differs(sd):
    """The correction matters: DDIM's default clip_sample=True gives other latents."""
    from diffusers.configuration_utils import FrozenDict

    ours = InDomainPipeline.from_sd(sd, scheduler=DDIMScheduler.from_config(_old_config(sd)))
    assert ours.scheduler.config.clip_sample is False
    kw = dict(prompt=PROMPT, w_c=5.0, num_inference_steps=STEPS, output_type="latent")
    fixed = ours(generator=torch.Generator().manual_seed(0), **kw).images
    ours.scheduler._internal_dict = FrozenDict({**ours.scheduler.config, "clip_sample": True})
    clipped = ours(generator=torch.Generator().manual_seed(0), **kw).images
    assert (fixed - clipped).abs().max() > 1e-3


def test_tiny_sd_carries_sd15_scheduler_config(sd):
    assert sd.scheduler.config.clip_sample is False and sd.scheduler.config.steps_offset == 1
    assert DDIMScheduler.from_config(sd.scheduler.config).config.clip_sample is False


def test_vae_slicing_and_tiling_helpers(sd):
    pipe = InDomainPipeline.from_sd(build_tiny_sd(seed=0))
    kw = dict(prompt=[PROMPT, "a blue square"], w_c=3.0, num_inference_steps=2, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    sliced = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(sliced, plain, atol=1e-5)  # one image at a time, same pixels
    pipe.disable_vae_slicing()
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_from_pipe_shares_the_models(sd):
    domain = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32), init="value")
    ours = InDomainPipeline.from_pipe(sd, domain_unet=domain)
    assert ours.unet is sd.unet and ours.vae is sd.vae and ours.domain_unet is domain
    back = StableDiffusionPipeline.from_pipe(
        ours, safety_checker=None, feature_extractor=None, image_encoder=None
    )
    assert back.unet is sd.unet and back.text_encoder is sd.text_encoder


def test_saved_pipeline_loads_through_plain_diffusers(sd, tmp_path):
    """A saved InDomainPipeline loads with DiffusionPipeline + custom_pipeline (no idgen import
    in the caller's code: diffusers imports the class from the folder's pipeline.py)."""
    domain = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32), init="value")
    InDomainPipeline.from_sd(sd, domain_unet=domain).save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe",
        custom_pipeline=str(tmp_path / "pipe" / "pipeline.py"),
        trust_remote_code=True,
    )
    assert type(loaded).__name__ == "InDomainPipeline"
    assert type(loaded.domain_unet).__name__ == "NullTextUNet"
    for k, v in domain.state_dict().items():
        assert torch.equal(loaded.domain_unet.state_dict()[k], v), k


def test_exported_domain_model_does_not_load_as_a_plain_unet(sd, tmp_path):
    domain = NullTextUNet.from_unet(sd.unet, torch.randn(1, 77, 32), init="value")
    domain.save_pretrained(tmp_path / "domain_model")
    with pytest.raises(Exception, match="NullTextUNet"):
        UNet2DConditionModel.from_pretrained(tmp_path / "domain_model")
    loaded = NullTextUNet.from_pretrained(tmp_path / "domain_model")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in domain.state_dict().items())
