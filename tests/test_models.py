import pytest
import torch
from diffusers import StableDiffusionPipeline

from idgen.models import SDLoadError, build_tiny_sd, load_sd


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_tiny_is_sd15_shaped():
    pipe = build_tiny_sd(seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8  # 4-level VAE like SD1.5
    assert len(pipe.vae.config.block_out_channels) == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    ids = pipe.tokenizer("a photo of a red circle", padding="max_length").input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    # Whole words are single tokens, as in CLIP's vocabulary: bos + 6 words + eos.
    assert len(pipe.tokenizer("a photo of a red circle").input_ids) == 8


def test_tiny_deterministic_per_seed():
    a, b, c = build_tiny_sd(seed=0), build_tiny_sd(seed=0), build_tiny_sd(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name


def test_tiny_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_save_and_load_sd_round_trip_bit_identical(tmp_path):
    pipe = build_tiny_sd(seed=0)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_sd(tmp_path / "sd")
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    drop = {"_use_default_values"}  # bookkeeping diffusers adds on load
    config = lambda p: {k: v for k, v in p.scheduler.config.items() if k not in drop}  # noqa: E731
    assert config(loaded) == config(pipe)
    # Same images from both pipelines.
    kw = dict(height=64, width=64, num_inference_steps=3, output_type="pt")
    img_a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    img_b = loaded("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(img_a, img_b)


def test_load_sd_dtype(tmp_path):
    build_tiny_sd(seed=0).save_pretrained(tmp_path / "sd")
    pipe = load_sd(tmp_path / "sd", torch_dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_load_sd_missing_folder_names_path_and_fix(tmp_path):
    missing = tmp_path / "no-such-sd15"
    with pytest.raises(SDLoadError) as err:
        load_sd(missing)
    msg = str(err.value)
    assert str(missing) in msg and "the folder itself" in msg and "hf download" in msg


def test_load_sd_incomplete_folder_lists_missing_parts(tmp_path):
    build_tiny_sd(seed=0).save_pretrained(tmp_path / "sd")
    for f in (tmp_path / "sd" / "unet").glob("*.safetensors"):
        f.unlink()
    for name in ("vocab.json", "tokenizer.json"):
        (tmp_path / "sd" / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(SDLoadError) as err:
        load_sd(tmp_path / "sd")
    msg = str(err.value)
    assert "unet/ weights" in msg and "tokenizer/vocab.json" in msg and str(tmp_path / "sd") in msg


def test_load_sd_hub_id_offline_is_clear_error():
    with pytest.raises(SDLoadError) as err:
        load_sd("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "offline" in str(err.value) and "hf download" in str(err.value)


@pytest.mark.parametrize(
    "builder, kwargs",
    [
        ("build_tiny_sd", {}),
        ("build_tiny_sdxl", {}),
        ("build_tiny_sd3", {}),
        ("build_tiny_sd3", {"t5": True}),
    ],
)
def test_tiny_preset_geometry_is_what_the_builder_builds(builder, kwargs):
    """Config checks read a tiny base's geometry from idgen.models.tiny_presets without building
    it: the numbers must be those of the model the builder makes."""
    import idgen.models as models
    from idgen.models.family import family_of
    from idgen.models.tiny_presets import tiny_geometry

    geometry = tiny_geometry({"_target_": f"idgen.models.{builder}", **kwargs})
    pipe = getattr(models, builder)(seed=0, **kwargs)
    denoiser = family_of(pipe).denoiser(pipe)
    assert geometry["family"] == family_of(pipe).name
    assert geometry["vae_factor"] == 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert geometry["in_channels"] == denoiser.config.in_channels
    assert geometry["sample_size"] == denoiser.config.sample_size
    if "cross_attention_dim" in geometry:
        assert geometry["cross_attention_dim"] == denoiser.config.cross_attention_dim
    if "text_encoder_3" in geometry:
        assert geometry["text_encoder_3"] == (pipe.text_encoder_3 is not None)
