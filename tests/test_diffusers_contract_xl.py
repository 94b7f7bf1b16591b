"""diffusers' pipeline contract on InDomainXLPipeline and InDomainSD3Pipeline: at w_d = 0 each
documented StableDiffusionXLPipeline / StableDiffusion3Pipeline behaviour (LoRA from a file made
with peft and saved by the pipeline class's own save_lora_weights, its per-call scale, diffusers'
CFG-cutoff callbacks, the guidance_scale alias, num_timesteps / interrupt, textual inversion on
both SDXL encoders) gives the same result on ours and on diffusers' pipeline over the same tiny
models. LoRAs of another family are refused in one line before anything is loaded."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.callbacks import SD3CFGCutoffCallback, SDXLCFGCutoffCallback
from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from safetensors.torch import save_file

from idgen.models import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
from idgen.models.lora import check_lora, lora_problem
from idgen.pipelines import InDomainPipeline, InDomainSD3Pipeline, InDomainXLPipeline
from idgen.pipelines.in_domain import make_scheduler
from tests.test_diffusers_contract import _has_lora, make_lora

STEPS = 4
PROMPT = "a photo of a red circle"
TOL = dict(rtol=1e-5, atol=1e-5)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _run(pipe, **kwargs) -> torch.Tensor:
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


def _xl_pair(seed: int = 0) -> tuple[InDomainXLPipeline, StableDiffusionXLPipeline]:
    """Ours and diffusers' SDXL on two copies of the same weights (a LoRA changes its copy)."""
    ref = build_tiny_sdxl(seed=seed)
    ref.scheduler = make_scheduler(ref.scheduler.config, "dpm++")
    ref.set_progress_bar_config(disable=True)
    base = build_tiny_sdxl(seed=seed)
    ours = InDomainXLPipeline.from_sd(base, scheduler=make_scheduler(base.scheduler.config))
    return ours, ref


def _sd3_pair() -> tuple[InDomainSD3Pipeline, StableDiffusion3Pipeline]:
    ref = build_tiny_sd3(seed=0)
    ref.set_progress_bar_config(disable=True)
    ours = InDomainSD3Pipeline.from_sd(build_tiny_sd3(seed=0))
    return ours, ref


def _lora_layers(model, targets: list[str]) -> dict[str, torch.Tensor]:
    """peft LoRA (random up matrices, so it changes the outputs) on ``model``'s ``targets``, as
    the state dict diffusers' save_lora_weights takes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
    # transformers 5's add_adapter wants peft >= 0.22; peft's own injection is the same layers
    inject_adapter_in_model(config, model)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def make_xl_lora(folder, seed: int = 0):
    """An SDXL LoRA on the UNet and both text encoders, saved by StableDiffusionXLPipeline."""
    base = build_tiny_sdxl(seed=0)
    torch.manual_seed(seed)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=_lora_layers(base.unet, UNET_TARGETS),
        text_encoder_lora_layers=_lora_layers(base.text_encoder, TEXT_TARGETS),
        text_encoder_2_lora_layers=_lora_layers(base.text_encoder_2, TEXT_TARGETS),
    )
    return folder


def make_sd3_lora(folder, seed: int = 0):
    """An SD3 LoRA on the transformer and the first text encoder, saved by StableDiffusion3Pipeline."""
    base = build_tiny_sd3(seed=0)
    torch.manual_seed(seed)
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=_lora_layers(base.transformer, UNET_TARGETS),
        text_encoder_lora_layers=_lora_layers(base.text_encoder, TEXT_TARGETS),
    )
    return folder


# ----------------------------------------------------------------------------- SDXL


def test_xl_has_sdxl_loader_mixins():
    assert issubclass(InDomainXLPipeline, StableDiffusionXLLoraLoaderMixin)
    assert issubclass(InDomainSD3Pipeline, SD3LoraLoaderMixin)


def test_xl_lora_equals_sdxl_with_the_same_lora(tmp_path):
    """load_lora_weights on ours acts on the frozen SDXL's UNet and both text encoders as on
    StableDiffusionXLPipeline; cross_attention_kwargs' scale reaches all three."""
    lora = make_xl_lora(tmp_path / "xl_lora")
    ours, ref = _xl_pair()
    plain = _run(ref, guidance_scale=5.0)
    ours.load_lora_weights(lora)
    ref.load_lora_weights(lora)
    for part in (ours.unet, ours.text_encoder, ours.text_encoder_2):
        assert _has_lora(part)
    mine = _run(ours, guidance_scale=5.0)
    torch.testing.assert_close(mine, _run(ref, guidance_scale=5.0), **TOL)
    assert (mine - plain).abs().max() > 1e-3  # the LoRA changes the images
    half = {"cross_attention_kwargs": {"scale": 0.5}, "guidance_scale": 5.0}
    mine_half = _run(ours, **half)
    torch.testing.assert_close(mine_half, _run(ref, **half), **TOL)
    assert (mine_half - mine).abs().max() > 1e-4


def test_xl_lora_of_another_family_is_refused(tmp_path):
    """An SD1.5 LoRA on the SDXL pipeline and the SDXL LoRA on the SD1.5 one: one line each,
    nothing loaded; the SDXL LoRA is recognised as SDXL (its text_encoder_2 weights)."""
    sd15_lora = make_lora(tmp_path / "sd15_lora")
    xl_lora = make_xl_lora(tmp_path / "xl_lora")
    ours, _ = _xl_pair()
    with pytest.raises(ValueError, match=r"LoRA '.*sd15_lora' does not fit this model"):
        ours.load_lora_weights(sd15_lora)
    assert not any(_has_lora(m) for m in (ours.unet, ours.text_encoder, ours.text_encoder_2))
    sd = InDomainPipeline.from_sd(build_tiny_sd(seed=0))
    with pytest.raises(ValueError, match=r"is a LoRA for SDXL .*text_encoder_2.*not for an SD15"):
        sd.load_lora_weights(xl_lora)
    assert not _has_lora(sd.unet)
    # headers only (preflight): the family decides, before any model is read
    assert check_lora(xl_lora, family="sdxl") is None
    assert "is a LoRA for SDXL" in check_lora(xl_lora, family="sd15")
    assert check_lora(sd15_lora, family="sd15") is None
    wide = check_lora(sd15_lora, cross_attention_dim=64, family="sdxl")  # tiny SDXL's width
    assert "text width 32" in wide and "this base's is 64" in wide
    transformer = {"transformer.a.lora_A.weight": [4, 8], "transformer.a.lora_B.weight": [8, 4]}
    assert "is a LoRA for SD3" in lora_problem(transformer, family="sdxl")
    assert lora_problem(transformer, family="sd3") is None
    kohya = {"lora_te2_text_model_x.lora_down.weight": [4, 8]}
    assert "SDXL" in lora_problem(kohya, family="sd15")
    assert lora_problem(kohya, family="sdxl") is None


def test_xl_cfg_cutoff_callback_equals_sdxl():
    """diffusers' SDXLCFGCutoffCallback (prompt_embeds, add_text_embeds, add_time_ids in;
    _guidance_scale set to 0 mid-run) gives SDXL's images."""
    ours, ref = _xl_pair()
    kw = dict(guidance_scale=6.0)
    mine = _run(ours, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5), **kw)
    theirs = _run(ref, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5), **kw)
    torch.testing.assert_close(mine, theirs, **TOL)
    assert (mine - _run(ours, **kw)).abs().max() > 1e-4


def test_xl_callback_replacing_rows_equals_sdxl():
    """A callback replacing the conditional prompt rows and time ids from a step on: as SDXL."""
    ours, ref = _xl_pair()
    other, _, other_pooled, _ = ref.encode_prompt(
        "a blue square", do_classifier_free_guidance=False
    )
    ids = torch.tensor([[32.0, 64.0, 0.0, 0.0, 64.0, 64.0]])

    def swap(rows_of):
        def callback(pipe, step, t, kwargs):
            if step == 1:
                return {
                    "prompt_embeds": rows_of(kwargs["prompt_embeds"], other),
                    "add_text_embeds": rows_of(kwargs["add_text_embeds"], other_pooled),
                    "add_time_ids": rows_of(kwargs["add_time_ids"], ids),
                }
            return kwargs

        return callback

    names = ["prompt_embeds", "add_text_embeds", "add_time_ids"]
    # SDXL hands over [uncond; cond] rows; ours the conditional rows only
    theirs = _run(
        ref,
        guidance_scale=5.0,
        callback_on_step_end=swap(lambda rows, new: torch.cat([rows[:1], new])),
        callback_on_step_end_tensor_inputs=names,
    )
    mine = _run(
        ours,
        guidance_scale=5.0,
        callback_on_step_end=swap(lambda rows, new: new),
        callback_on_step_end_tensor_inputs=names,
    )
    torch.testing.assert_close(mine, theirs, **TOL)
    assert (mine - _run(ours, guidance_scale=5.0)).abs().max() > 1e-4


def test_xl_properties_alias_and_interrupt_equal_sdxl():
    """guidance_scale (alias of w_c), num_timesteps and do_classifier_free_guidance read as on
    SDXL during a run; _interrupt set in a callback stops both the same way."""
    ours, ref = _xl_pair()

    def recorder(seen):
        def callback(pipe, step, t, kwargs):
            seen.append((pipe.guidance_scale, pipe.num_timesteps, pipe.do_classifier_free_guidance))
            return kwargs

        return callback

    mine_seen, theirs_seen = [], []
    mine = _run(ours, guidance_scale=4.0, callback_on_step_end=recorder(mine_seen))
    theirs = _run(ref, guidance_scale=4.0, callback_on_step_end=recorder(theirs_seen))
    torch.testing.assert_close(mine, theirs, **TOL)
    assert mine_seen == theirs_seen == [(4.0, STEPS, True)] * STEPS
    with pytest.raises(ValueError, match="guidance_scale is diffusers' name for w_c"):
        _run(ours, guidance_scale=4.0, w_c=4.0)

    def stop_after_one(pipe, step, t, kwargs):
        pipe._interrupt = step >= 1
        return kwargs

    mine = _run(ours, guidance_scale=4.0, callback_on_step_end=stop_after_one)
    assert ours.interrupt
    theirs = _run(ref, guidance_scale=4.0, callback_on_step_end=stop_after_one)
    torch.testing.assert_close(mine, theirs, **TOL)
    assert (mine - _run(ours, guidance_scale=4.0)).abs().max() > 1e-4


def test_xl_textual_inversion_in_both_encoders_equals_sdxl(tmp_path):
    """An SDXL embedding (one vector per encoder, "clip_l" / "clip_g") loaded as diffusers
    documents (load_textual_inversion twice, the second with text_encoder_2 / tokenizer_2)."""
    g = torch.Generator().manual_seed(3)
    files = {}
    for name in ("clip_l", "clip_g"):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"<shape>": torch.randn(2, 32, generator=g)}, str(files[name]))
    ours, ref = _xl_pair()
    for pipe in (ours, ref):
        pipe.load_textual_inversion(str(files["clip_l"]), token="<shape>")
        pipe.load_textual_inversion(
            str(files["clip_g"]),
            token="<shape>",
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
    kw = dict(prompt="a photo of <shape>", negative_prompt="<shape> blurry", guidance_scale=5.0)
    mine = _run(ours, **kw)
    torch.testing.assert_close(mine, _run(ref, **kw), **TOL)
    assert (mine - _run(ours, prompt="a photo of", guidance_scale=5.0)).abs().max() > 1e-4


# ----------------------------------------------------------------------------- SD3


def test_sd3_lora_equals_sd3_with_the_same_lora(tmp_path):
    """load_lora_weights on ours acts on the frozen SD3 transformer and text encoder as on
    StableDiffusion3Pipeline; joint_attention_kwargs' scale reaches both."""
    lora = make_sd3_lora(tmp_path / "sd3_lora")
    ours, ref = _sd3_pair()
    plain = _run(ref, guidance_scale=4.5)
    ours.load_lora_weights(lora)
    ref.load_lora_weights(lora)
    assert _has_lora(ours.transformer) and _has_lora(ours.text_encoder)
    mine = _run(ours, guidance_scale=4.5)
    torch.testing.assert_close(mine, _run(ref, guidance_scale=4.5), **TOL)
    assert (mine - plain).abs().max() > 1e-3
    half = {"joint_attention_kwargs": {"scale": 0.5}, "guidance_scale": 4.5}
    mine_half = _run(ours, **half)
    torch.testing.assert_close(mine_half, _run(ref, **half), **TOL)
    assert (mine_half - mine).abs().max() > 1e-4
    # a UNet LoRA is refused on the transformer base, nothing loaded
    fresh, _ = _sd3_pair()
    with pytest.raises(ValueError, match=r"is a LoRA for .*unet.*not for an SD3 base"):
        fresh.load_lora_weights(make_lora(tmp_path / "sd15_lora"))
    assert not _has_lora(fresh.transformer)


def test_sd3_cfg_cutoff_callback_and_properties_equal_sd3():
    """diffusers' SD3CFGCutoffCallback, the guidance_scale alias, num_timesteps and interrupt."""
    ours, ref = _sd3_pair()
    kw = dict(guidance_scale=6.0)
    cutoff = SD3CFGCutoffCallback(cutoff_step_ratio=0.5)
    mine = _run(ours, callback_on_step_end=cutoff, **kw)
    torch.testing.assert_close(mine, _run(ref, callback_on_step_end=cutoff, **kw), **TOL)
    assert (mine - _run(ours, **kw)).abs().max() > 1e-4
    seen: dict[str, list] = {"ours": [], "ref": []}

    def recorder(key):
        def callback(pipe, step, t, kwargs):
            seen[key].append((pipe.guidance_scale, pipe.num_timesteps))
            pipe._interrupt = step >= 1
            return kwargs

        return callback

    mine = _run(ours, callback_on_step_end=recorder("ours"), **kw)
    theirs = _run(ref, callback_on_step_end=recorder("ref"), **kw)
    torch.testing.assert_close(mine, theirs, **TOL)
    assert seen["ours"] == seen["ref"] == [(6.0, STEPS)] * 2


# ----------------------------------------------------------------------------- CLI


def _sample_xl(tmp_path, overrides) -> list:
    import numpy as np
    from PIL import Image

    from idgen.preflight import validate_sample
    from idgen.sample import sample
    from tests.conftest import compose_config

    cfg = compose_config(
        "sample",
        tmp_path,
        [
            "model=tiny_sdxl",
            "prompts=[a photo of a red circle]",
            "images_per_prompt=1",
            "batch_size=1",
            "resolution=64",
            "sampler=cfg",
            "sampler.num_inference_steps=2",
            *overrides,
        ],
    )
    validate_sample(cfg)
    sample(cfg)
    return [np.asarray(Image.open(p)) for p in sorted((tmp_path / "run" / "samples").glob("*.png"))]


def test_sampler_lora_on_tiny_sdxl_cli(tmp_path):
    """idgen-sample model=tiny_sdxl sampler.lora=[...] loads an SDXL LoRA (it changes the
    samples); an SD1.5 LoRA is refused by preflight in one line naming the key."""
    from idgen.utils.validation import ConfigError
    from tests.conftest import compose_config

    xl_lora = make_xl_lora(tmp_path / "xl_lora")
    plain = _sample_xl(tmp_path / "plain", [])
    with_lora = _sample_xl(tmp_path / "lora", [f"sampler.lora=[{{path: {xl_lora}, scale: 0.5}}]"])
    assert len(plain) == len(with_lora) == 1
    assert (plain[0].astype(int) - with_lora[0].astype(int)).__abs__().max() > 0
    sd15_lora = make_lora(tmp_path / "sd15_lora")
    cfg = compose_config(
        "sample", tmp_path / "bad", ["model=tiny_sdxl", f"sampler.lora=[{{path: {sd15_lora}}}]"]
    )
    with pytest.raises(ConfigError, match=r"sampler\.lora\.0\.path=.*text width 32"):
        from idgen.preflight import validate_sample

        validate_sample(cfg)
