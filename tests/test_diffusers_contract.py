"""diffusers' pipeline contract on InDomainPipeline: each documented StableDiffusionPipeline
behaviour, run on ours (w_d = 0) and on diffusers' StableDiffusionPipeline over the same tiny
components, must give the same result; adapters (LoRA, textual inversion) and single files are
made in the test with peft / diffusers and loaded into both."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from safetensors.torch import save_file

from idgen.models import build_tiny_sd
from idgen.models.loading import sd_pipeline
from idgen.pipelines import InDomainPipeline

STEPS = 4
PROMPT = "a photo of a red circle"
TOL = dict(rtol=1e-5, atol=1e-5)


def _dpm(config):
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def _pair(sd, make=_dpm) -> tuple[InDomainPipeline, StableDiffusionPipeline]:
    """Ours and diffusers' SD over the same models, each with its own scheduler instance."""
    ours = InDomainPipeline.from_sd(sd, scheduler=make(sd.scheduler.config))
    ref = sd_pipeline(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, make(sd.scheduler.config))
    return ours, ref


def _run(pipe, **kwargs) -> torch.Tensor:
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd(seed=0)


# ----------------------------------------------------------------------------- call arguments


def test_call_takes_every_argument_of_sd(sd):
    """Every non-deprecated StableDiffusionPipeline.__call__ argument exists on ours."""
    theirs = set(inspect.signature(StableDiffusionPipeline.__call__).parameters)
    ours = set(inspect.signature(InDomainPipeline.__call__).parameters)
    assert theirs - {"callback", "callback_steps", "kwargs"} <= ours
    assert set(StableDiffusionPipeline._callback_tensor_inputs) <= set(
        InDomainPipeline._callback_tensor_inputs
    )


@pytest.mark.parametrize("scale", [5.0, 1.0, 0.5])
def test_guidance_scale_equals_sd(sd, scale):
    """guidance_scale is w_c in diffusers' units: at or below 1, guidance is off (SD then uses
    the prompt's prediction alone)."""
    ours, ref = _pair(sd)
    torch.testing.assert_close(
        _run(ours, guidance_scale=scale), _run(ref, guidance_scale=scale), **TOL
    )


def test_guidance_scale_equals_w_c_above_one(sd):
    ours, _ = _pair(sd)
    torch.testing.assert_close(_run(ours, guidance_scale=4.0), _run(ours, w_c=4.0), rtol=0, atol=0)


def test_guidance_scale_with_w_c_is_an_error(sd):
    ours, _ = _pair(sd)
    with pytest.raises(ValueError, match="guidance_scale=5.0 and w_c=3.0"):
        ours(PROMPT, guidance_scale=5.0, w_c=3.0, num_inference_steps=1)


def test_guidance_rescale_equals_sd(sd):
    ours, ref = _pair(sd)
    kw = dict(guidance_scale=6.0, guidance_rescale=0.7)
    mine, theirs = _run(ours, **kw), _run(ref, **kw)
    torch.testing.assert_close(mine, theirs, **TOL)
    assert (mine - _run(ours, guidance_scale=6.0)).abs().max() > 1e-4  # it does something


@pytest.mark.parametrize(
    "schedule",
    [{"timesteps": [999, 700, 400, 100]}, {"sigmas": [14.6, 6.0, 2.0, 0.5]}],
    ids=["timesteps", "sigmas"],
)
def test_custom_schedule_equals_sd(sd, schedule):
    ours, ref = _pair(sd, EulerDiscreteScheduler.from_config)
    kw = dict(guidance_scale=5.0, num_inference_steps=None, **schedule)
    torch.testing.assert_close(_run(ours, **kw), _run(ref, **kw), **TOL)
    assert ours.num_timesteps == ref.num_timesteps == len(ours.scheduler.timesteps) >= 3


def test_eta_equals_sd(sd):
    ours, ref = _pair(sd, DDIMScheduler.from_config)
    mine = _run(ours, guidance_scale=5.0, eta=1.0)
    torch.testing.assert_close(mine, _run(ref, guidance_scale=5.0, eta=1.0), **TOL)
    assert (mine - _run(ours, guidance_scale=5.0)).abs().max() > 1e-4


def _clip_skip_features(sd, text: str, skip: int) -> torch.Tensor:
    """What SD's encode_prompt computes for clip_skip: the hidden states ``skip`` layers before
    the last, through the final layer norm."""
    ids = sd.tokenizer(
        [text], padding="max_length", max_length=sd.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    hidden = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
    return sd.text_encoder.final_layer_norm(hidden)


def test_clip_skip_equals_sd(sd):
    """diffusers 0.42.1's own clip_skip reads ``text_encoder.text_model``, which transformers 5's
    CLIPTextModel no longer has (SD raises AttributeError); SD is given the same features as
    prompt_embeds (its negative prompt is encoded without clip_skip, as ours is)."""
    ours, ref = _pair(sd)
    with torch.no_grad():
        features = _clip_skip_features(sd, PROMPT, 1)
    mine = _run(ours, guidance_scale=5.0, clip_skip=1)
    theirs = _run(ref, prompt=None, prompt_embeds=features, guidance_scale=5.0)
    torch.testing.assert_close(mine, theirs, **TOL)
    assert (mine - _run(ours, guidance_scale=5.0)).abs().max() > 1e-4


def test_encode_prompt_is_sds(sd):
    """Same signature (names and defaults) and same return as SD's encode_prompt."""
    ours, ref = _pair(sd)

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(InDomainPipeline.encode_prompt) == params(StableDiffusionPipeline.encode_prompt)
    cases = [
        ((PROMPT, "cpu", 1, False), {}),
        (([PROMPT, "a blue square"], "cpu", 2, True), {"negative_prompt": ["dark", "light"]}),
        ((None, "cpu", 3, True), {"prompt_embeds": torch.randn(2, 77, 32)}),
    ]
    for args, kwargs in cases:
        mine, theirs = ours.encode_prompt(*args, **kwargs), ref.encode_prompt(*args, **kwargs)
        for a, b in zip(mine, theirs, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encode_prompt_output_feeds_the_call_as_in_sd(sd):
    """SD code that encodes once and passes prompt_embeds / negative_prompt_embeds works on ours."""
    ours, ref = _pair(sd)
    pe, ne = ref.encode_prompt(
        [PROMPT, "a blue square"], "cpu", 2, True, negative_prompt=["x", "y"]
    )
    kw = dict(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=5.0)
    torch.testing.assert_close(_run(ours, **kw), _run(ref, **kw), **TOL)


# ----------------------------------------------------------------------------- properties, callbacks

STATE = (
    "num_timesteps",
    "guidance_scale",
    "do_classifier_free_guidance",
    "guidance_rescale",
    "clip_skip",
    "cross_attention_kwargs",
    "interrupt",
)


def test_properties_during_a_run_equal_sd(sd):
    ours, ref = _pair(sd)
    seen = {"ours": [], "ref": []}

    def recorder(key):
        def callback(pipe, step, t, kwargs):
            seen[key].append({name: getattr(pipe, name) for name in STATE})
            return kwargs

        return callback

    kw = dict(guidance_scale=5.0, guidance_rescale=0.3, cross_attention_kwargs={"scale": 0.5})
    _run(ours, callback_on_step_end=recorder("ours"), **kw)
    _run(ref, callback_on_step_end=recorder("ref"), **kw)
    assert seen["ours"] == seen["ref"] and len(seen["ours"]) == STEPS
    assert ours.clip_skip is None and ours(PROMPT, num_inference_steps=1, clip_skip=1).images
    assert ours.clip_skip == 1
    assert seen["ours"][0]["num_timesteps"] == STEPS


def test_automatic_weights_report_the_control_weight(sd):
    ours, _ = _pair(sd)
    seen = []

    def callback(pipe, step, t, kwargs):
        seen.append(pipe.guidance_scale)
        return kwargs

    out = ours(PROMPT, num_inference_steps=2, output_type="latent", callback_on_step_end=callback)
    assert seen[0] is not None
    torch.testing.assert_close(seen[0].float().cpu(), out.guidance_weights["control"])


def test_interrupt_equals_sd(sd):
    ours, ref = _pair(sd)

    def stop_after_one(pipe, step, t, kwargs):
        pipe._interrupt = step >= 1
        return kwargs

    kw = dict(guidance_scale=5.0, callback_on_step_end=stop_after_one)
    mine = _run(ours, **kw)
    torch.testing.assert_close(mine, _run(ref, **kw), **TOL)
    assert (mine - _run(ours, guidance_scale=5.0)).abs().max() > 1e-4


def test_sd_cfg_cutoff_callback_equals_sd(sd):
    """diffusers' own SDCFGCutoffCallback: prompt_embeds in, _guidance_scale set to 0 mid-run."""
    ours, ref = _pair(sd)
    kw = dict(guidance_scale=6.0)
    mine = _run(ours, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **kw)
    theirs = _run(ref, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **kw)
    torch.testing.assert_close(mine, theirs, **TOL)
    assert (mine - _run(ours, **kw)).abs().max() > 1e-4


def test_callback_changing_the_weight_equals_sd(sd):
    """A callback may lower the weight mid-run: diffusers' _guidance_scale, or ours by name."""
    ours, ref = _pair(sd)

    def set_scale(pipe, step, t, kwargs):
        if step == 1:
            pipe._guidance_scale = 2.0
        return kwargs

    def set_weight(pipe, step, t, kwargs):
        if step == 1:
            kwargs["guidance_weights"] = {"control": 2.0}
        return kwargs

    theirs = _run(ref, guidance_scale=6.0, callback_on_step_end=set_scale)
    torch.testing.assert_close(
        _run(ours, guidance_scale=6.0, callback_on_step_end=set_scale), theirs, **TOL
    )
    by_name = _run(
        ours,
        guidance_scale=6.0,
        callback_on_step_end=set_weight,
        callback_on_step_end_tensor_inputs=["guidance_weights"],
    )
    torch.testing.assert_close(by_name, theirs, **TOL)


def test_callback_replacing_prompt_embeds_equals_sd(sd):
    """A callback may swap the prompt mid-run. SD hands over [negative; prompt] rows (CFG on),
    ours the prompt rows and the negative rows apart; the same swap gives the same images."""
    ours, ref = _pair(sd)
    other = ref.encode_prompt("a blue square", "cpu", 1, False)[0]

    def swap_ref(pipe, step, t, kwargs):
        if step == 1:
            kwargs["prompt_embeds"] = torch.cat([kwargs["prompt_embeds"][:1], other])
        return kwargs

    def swap_ours(pipe, step, t, kwargs):
        if step == 1:
            kwargs["prompt_embeds"] = other
        return kwargs

    names = ["prompt_embeds"]
    kw = dict(guidance_scale=5.0, callback_on_step_end_tensor_inputs=names)
    mine = _run(ours, callback_on_step_end=swap_ours, **kw)
    torch.testing.assert_close(mine, _run(ref, callback_on_step_end=swap_ref, **kw), **TOL)
    assert (mine - _run(ours, guidance_scale=5.0)).abs().max() > 1e-4


@pytest.mark.parametrize("how", ["guidance_scale", "guidance_weights"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_callback_setting_a_non_finite_weight_is_an_error(sd, how, bad):
    ours, _ = _pair(sd)
    decoded = []
    ours.vae.register_forward_pre_hook(lambda *a: decoded.append(1))

    def callback(pipe, step, t, kwargs):
        if how == "guidance_scale":
            pipe._guidance_scale = bad
        else:
            kwargs["guidance_weights"] = {"control": bad}
        return kwargs

    with pytest.raises(ValueError, match="not a finite number"):
        ours(
            PROMPT,
            guidance_scale=5.0,
            num_inference_steps=2,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["guidance_weights"],
        )
    assert not decoded  # stopped before any image was made


# ----------------------------------------------------------------------------- mixins


def test_sd_mixins(sd):
    for mixin in (
        StableDiffusionMixin,
        TextualInversionLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        IPAdapterMixin,
        FromSingleFileMixin,
    ):
        assert issubclass(InDomainPipeline, mixin), mixin.__name__


def test_freeu_and_fused_qkv_equal_sd():
    sd = build_tiny_sd(seed=0)  # both change the (shared) UNet
    ours, ref = _pair(sd)
    plain = _run(ours, guidance_scale=5.0)
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    mine = _run(ours, guidance_scale=5.0)
    torch.testing.assert_close(mine, _run(ref, guidance_scale=5.0), **TOL)
    assert (mine - plain).abs().max() > 1e-4
    ours.disable_freeu()
    ours.fuse_qkv_projections()
    fused = _run(ours, guidance_scale=5.0)
    torch.testing.assert_close(fused, _run(ref, guidance_scale=5.0), **TOL)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)  # same math, fused matmuls
    ours.unfuse_qkv_projections()


# ----------------------------------------------------------------------------- adapters, single file


def make_lora(folder, cross_attention_dim: int = 32, seed: int = 0):
    """A LoRA on the tiny SD's UNet attention and text encoder, made with peft and saved with
    diffusers' save_lora_weights (random up matrices, so it changes the images)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    base = build_tiny_sd(seed=0, cross_attention_dim=cross_attention_dim)
    torch.manual_seed(seed)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    text_config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    base.unet.add_adapter(unet_config)
    # transformers 5's add_adapter wants peft >= 0.22; peft's own injection is the same layers
    inject_adapter_in_model(text_config, base.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(base.text_encoder)
        ),
    )
    return folder


def _has_lora(module) -> bool:
    return any("lora" in name for name, _ in module.named_modules())


def test_lora_equals_sd_with_the_same_lora(tmp_path):
    """load_lora_weights on ours acts on the frozen SD (control and unconditional terms) as on
    StableDiffusionPipeline; cross_attention_kwargs' scale reaches UNet and text encoder."""
    lora = make_lora(tmp_path / "lora")
    plain_sd = build_tiny_sd(seed=0)
    ours = InDomainPipeline.from_sd(
        build_tiny_sd(seed=0), scheduler=_dpm(plain_sd.scheduler.config)
    )
    base = sd_pipeline(
        **{k: getattr(plain_sd, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
        scheduler=_dpm(plain_sd.scheduler.config),
    )
    plain = _run(base, guidance_scale=5.0)
    ref = build_tiny_sd(seed=0)
    ref.scheduler = _dpm(ref.scheduler.config)
    ours.load_lora_weights(lora)
    ref.load_lora_weights(lora)
    assert _has_lora(ours.unet) and _has_lora(ours.text_encoder)
    mine = _run(ours, guidance_scale=5.0)
    torch.testing.assert_close(mine, _run(ref, guidance_scale=5.0), **TOL)
    assert (mine - plain).abs().max() > 1e-3  # the LoRA changes the images
    half = {"cross_attention_kwargs": {"scale": 0.5}, "guidance_scale": 5.0}
    mine_half = _run(ours, **half)
    torch.testing.assert_close(mine_half, _run(ref, **half), **TOL)
    assert (mine_half - mine).abs().max() > 1e-4
    # the text encoder's LoRA is loaded too: the prompt features differ from the plain encoder's
    with torch.no_grad():
        lora_feats = ours.encode_prompt(PROMPT, "cpu", 1, False)[0]
        plain_feats = base.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert (lora_feats - plain_feats).abs().max() > 1e-4


def test_lora_for_another_base_is_an_error(tmp_path):
    """A LoRA made for a base with another text width: one line, nothing loaded."""
    lora = make_lora(tmp_path / "wide", cross_attention_dim=64)
    ours = InDomainPipeline.from_sd(build_tiny_sd(seed=0))
    with pytest.raises(
        ValueError,
        match=r"LoRA '.*wide' does not fit this model: .* input size 64 in the LoRA but 32",
    ):
        ours.load_lora_weights(lora)
    assert not _has_lora(ours.unet) and not _has_lora(ours.text_encoder)
    sdxl_like = {
        "text_encoder_2.foo.lora_A.weight": torch.zeros(4, 8),
        "unet.x.lora_A.weight": torch.zeros(4, 8),
    }
    with pytest.raises(ValueError, match="SDXL"):
        ours.load_lora_weights(sdxl_like)


def _embedding_file(path, width: int, vectors: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    save_file({"<shape>": torch.randn(vectors, width, generator=g)}, str(path))
    return path


def test_textual_inversion_equals_sd(tmp_path):
    """A multi-vector embedding file loads into ours as into SD; prompts with its token (and the
    negative prompt) are expanded by encode_prompt as diffusers does."""
    emb = _embedding_file(tmp_path / "shape.safetensors", width=32)
    ours = InDomainPipeline.from_sd(
        build_tiny_sd(seed=0), scheduler=_dpm(build_tiny_sd().scheduler.config)
    )
    ref = build_tiny_sd(seed=0)
    ref.scheduler = _dpm(ref.scheduler.config)
    ours.load_textual_inversion(str(emb))
    ref.load_textual_inversion(str(emb))
    kw = dict(prompt="a photo of <shape>", negative_prompt="<shape> blurry", guidance_scale=5.0)
    mine = _run(ours, **kw)
    torch.testing.assert_close(mine, _run(ref, **kw), **TOL)
    assert (mine - _run(ours, prompt="a photo of", guidance_scale=5.0)).abs().max() > 1e-4


def test_textual_inversion_of_another_width_is_an_error(tmp_path):
    emb = _embedding_file(tmp_path / "wide.safetensors", width=64)
    ours = InDomainPipeline.from_sd(build_tiny_sd(seed=0))
    before = len(ours.tokenizer)
    with pytest.raises(ValueError, match="incorrect shape"):
        ours.load_textual_inversion(str(emb))
    assert len(ours.tokenizer) == before


def test_single_file_round_trip_equals_sd(tmp_path):
    """The tiny SD saved as ONE original-layout .safetensors (as community checkpoints ship),
    read back by from_single_file on ours and on SD with a config folder of OTHER weights (so
    the weights must come from the file): same weights, same images as the original."""
    from idgen.models.loading import load_sd
    from idgen.models.single_file import UNET_PREFIX, save_single_file

    original = build_tiny_sd(seed=0)
    file = save_single_file(original, tmp_path / "community.safetensors")
    build_tiny_sd(seed=1).save_pretrained(tmp_path / "config")  # geometry only
    kw = dict(config=str(tmp_path / "config"), local_files_only=True)
    ours = InDomainPipeline.from_single_file(str(file), **kw)
    ref = StableDiffusionPipeline.from_single_file(str(file), safety_checker=None, **kw)
    via_cli = load_sd(str(file), config=str(tmp_path / "config"))  # model.pretrained=<file>
    with __import__("safetensors").safe_open(str(file), "pt") as f:
        assert any(k.startswith(UNET_PREFIX + "input_blocks.") for k in f.keys())
    for pipe in (ours, ref, via_cli):
        for name in ("unet", "vae", "text_encoder"):
            theirs = getattr(original, name).state_dict()
            for key, value in getattr(pipe, name).state_dict().items():
                assert torch.equal(value, theirs[key]), (name, key)
    for pipe in (ours, ref, via_cli, original):
        pipe.scheduler = _dpm(original.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    expected = _run(original, guidance_scale=5.0)
    mine = _run(ours, guidance_scale=5.0)
    torch.testing.assert_close(mine, _run(ref, guidance_scale=5.0), rtol=0, atol=0)
    # from_single_file keeps the file's memory-mapped (unaligned) tensors, which CPU kernels sum
    # in another order (see idgen.models.loading.own_weights): equal to ~1e-5; load_sd copies
    # them, and is bit-exact.
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_run(via_cli, guidance_scale=5.0), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"weight": torch.zeros(2)}, "not an SD1.5 single-file checkpoint"),
        ({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, "SDXL"),
        (None, "not a readable .safetensors"),
    ],
    ids=["random-keys", "sdxl", "not-safetensors"],
)
def test_single_file_that_is_not_sd15_is_an_error(tmp_path, content, message):
    from idgen.models import SDLoadError
    from idgen.models.loading import load_sd

    file = tmp_path / "model.safetensors"
    if content is None:
        file.write_bytes(b"this is not a checkpoint")
    else:
        save_file(content, str(file))
    with pytest.raises(SDLoadError, match=message):
        load_sd(str(file), config=str(tmp_path))


# ----------------------------------------------------------------------------- IP-Adapter


def tiny_ip_adapter(unet, tokens: int = 4, width: int = 32, seed: int = 5) -> dict:
    """An IP-Adapter state dict for ``unet`` in the original layout diffusers loads: an image
    projection (image embedding -> ``tokens`` text-width tokens) and to_k_ip / to_v_ip for each
    cross-attention, numbered as the original files number them (1, 3, 5, ...)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = {
        "proj.weight": torch.randn(cross * tokens, width, generator=g) * 0.1,
        "proj.bias": torch.zeros(cross * tokens),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    layers = {}
    attn2 = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(attn2):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * i + 1}.{kind}.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
    return {"image_proj": proj, "ip_adapter": layers}


def test_ip_adapter_equals_sd():
    """load_ip_adapter + ip_adapter_image: the image conditions the frozen SD's text term and
    zeros its unconditional one, exactly as in StableDiffusionPipeline."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        )
    ).eval()
    a, b = build_tiny_sd(seed=0), build_tiny_sd(seed=0)
    state = tiny_ip_adapter(a.unet)
    ours = InDomainPipeline(
        a.vae, a.text_encoder, a.tokenizer, a.unet, _dpm(a.scheduler.config), image_encoder=encoder
    )
    ref = StableDiffusionPipeline(
        b.vae,
        b.text_encoder,
        b.tokenizer,
        b.unet,
        _dpm(b.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=encoder,
        requires_safety_checker=False,
    )
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(
            {k: dict(v) for k, v in state.items()}, subfolder="", weight_name="ip.bin"
        )
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8))
    kw = dict(guidance_scale=5.0, ip_adapter_image=image)
    mine = _run(ours, **kw)
    torch.testing.assert_close(mine, _run(ref, **kw), **TOL)
    # precomputed embeddings ([negative; positive] per adapter, diffusers' layout) give the same
    embeds = ref.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)
    given = _run(ours, guidance_scale=5.0, ip_adapter_image_embeds=embeds)
    torch.testing.assert_close(given, mine, **TOL)
    ours.set_ip_adapter_scale(0.0)  # the adapter off: the plain prompt's image
    ref.set_ip_adapter_scale(0.0)
    off = _run(ours, **kw)
    torch.testing.assert_close(off, _run(ref, **kw), **TOL)
    assert (mine - off).abs().max() > 1e-4
