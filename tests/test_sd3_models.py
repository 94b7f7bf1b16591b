"""SD3 as a model family: the tiny SD3 (a diffusers StableDiffusion3Pipeline, no T5), its save /
load round trip, folders recognised and refused (wrong family, FLUX) before loading, and the
null-text transformer (learned context tokens + pooled vector, no text input)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from idgen.models import (
    FAMILIES,
    FamilyError,
    NullTextSD3Transformer,
    build_tiny_sd,
    build_tiny_sd3,
    family_of,
    load_sd,
)


@pytest.fixture(scope="module")
def tiny3():
    return build_tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, tiny3):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    tiny3.save_pretrained(folder)
    return folder


def _sample(pipe, **kw):
    return pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).images


def test_tiny_sd3_layout(tiny3):
    assert type(tiny3) is StableDiffusion3Pipeline
    assert tiny3.text_encoder_3 is None and tiny3.tokenizer_3 is None
    assert tiny3.vae.config.latent_channels == tiny3.transformer.config.in_channels == 16
    assert type(tiny3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert tiny3.scheduler.config.shift == 3.0
    pooled = tiny3.text_encoder.config.projection_dim + tiny3.text_encoder_2.config.projection_dim
    assert tiny3.transformer.config.pooled_projection_dim == pooled
    same = build_tiny_sd3(seed=0)
    for a, b in zip(tiny3.transformer.parameters(), same.transformer.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sd3_prompt_encoding_is_the_pipelines(tiny3):
    """The family's (embeds, pooled) are what StableDiffusion3Pipeline feeds its transformer:
    CLIP hidden states padded to the context width, then zero T5 tokens (no T5)."""
    embeds, pooled = FAMILIES["sd3"].encode_prompt(tiny3, ["a red circle"])
    ref, _, ref_pooled, _ = tiny3.encode_prompt(
        "a red circle", None, None, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(embeds, ref) and torch.equal(pooled, ref_pooled)
    clip_tokens = tiny3.tokenizer.model_max_length
    assert embeds.shape == (1, clip_tokens + 256, tiny3.transformer.config.joint_attention_dim)
    assert not embeds[:, clip_tokens:].any()  # the T5 part: zeros without T5


def test_sd3_family_is_recognised(tiny3, sd3_folder):
    assert family_of(tiny3).name == "sd3"
    assert family_of(sd3_folder).name == "sd3"
    assert family_of(tiny3.transformer).name == "sd3"
    assert family_of(build_tiny_sd().unet).name == "sd15"  # a UNet is not claimed by SD3


def test_sd3_folder_round_trip(tiny3, sd3_folder):
    """Saved without T5, the folder loads with diffusers (told text_encoder_3=None, as its docs
    say) and with load_sd (which reads that from model_index.json): same images."""
    ref = _sample(tiny3)
    plain = StableDiffusion3Pipeline.from_pretrained(
        sd3_folder, text_encoder_3=None, tokenizer_3=None
    )
    plain.set_progress_bar_config(disable=True)
    ours = load_sd(sd3_folder, family="sd3")
    assert type(ours) is StableDiffusion3Pipeline
    assert abs(_sample(plain) - ref).max() < 1e-5
    assert abs(_sample(ours) - ref).max() < 1e-5


def test_sd3_folder_under_another_family_is_refused(sd3_folder):
    with pytest.raises(FamilyError, match=r"sd3 folder \(StableDiffusion3Pipeline\).*model=sd3"):
        load_sd(sd3_folder, family="sdxl")


def test_flux_folder_is_refused_with_the_reason(sd3_folder, tmp_path):
    flux = tmp_path / "flux"
    shutil.copytree(sd3_folder, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    for family in ("sd3", "sd15"):
        with pytest.raises(FamilyError, match="guidance-distilled.*unconditional") as err:
            load_sd(flux, family=family)
        assert "\n" not in str(err.value)


# --- the null-text transformer --------------------------------------------------------------


@pytest.fixture(scope="module")
def features(tiny3):
    return FAMILIES["sd3"].encode_prompt(tiny3, ["a photo of a face"])


def test_null_text_transformer_is_the_transformer_on_its_context(tiny3, features):
    """At initialisation the domain model equals SD3's transformer on F^T (its context) and the
    pooled F^T, called with latents and timestep only."""
    embeds, pooled = features
    domain = NullTextSD3Transformer.from_transformer(tiny3.transformer, embeds, pooled)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 100.0])
    ref = tiny3.transformer(
        hidden_states=x,
        encoder_hidden_states=embeds.expand(2, -1, -1),
        pooled_projections=pooled.expand(2, -1),
        timestep=t,
    ).sample
    assert torch.equal(domain(x, t).sample, ref)
    # the family's call convention gives the same
    got = FAMILIES["sd3"].predict(
        tiny3.transformer, x, t, embeds.expand(2, -1, -1), pooled.expand(2, -1)
    )
    assert torch.equal(got, ref)
    # it learns its context: both stand-ins are parameters, and the source is untouched
    names = {n for n, _ in domain.named_parameters()}
    assert {"context_tokens", "pooled_embedding"} <= names
    assert not any("context_tokens" in n for n, _ in tiny3.transformer.named_parameters())


def test_null_text_transformer_round_trip_and_loud_misload(tiny3, features, tmp_path):
    embeds, pooled = features
    domain = NullTextSD3Transformer.from_transformer(tiny3.transformer, embeds, pooled)
    with torch.no_grad():
        domain.context_tokens.add_(0.5)  # trained-looking, not the initial features
    domain.save_pretrained(tmp_path)
    back = NullTextSD3Transformer.from_pretrained(tmp_path)
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(back(x, 500.0).sample, domain(x, 500.0).sample)
    with pytest.raises(ValueError, match="NullTextSD3Transformer.from_pretrained"):
        SD3Transformer2DModel.from_pretrained(tmp_path)


def test_null_text_transformer_refuses_wrong_shapes(tiny3, features):
    embeds, pooled = features
    with pytest.raises(ValueError, match="joint_attention_dim"):
        NullTextSD3Transformer.from_transformer(tiny3.transformer, embeds[..., :8], pooled)
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        NullTextSD3Transformer.from_transformer(tiny3.transformer, embeds, pooled[:, :5])
    with pytest.raises(ValueError, match="pooled F"):
        FAMILIES["sd3"].null_text_model(tiny3.transformer, embeds, None)


def test_tiny_sd3_with_t5_round_trip(tmp_path):
    """With the optional tiny T5 (an offline T5 tokenizer): the T5 tokens are no longer zeros,
    the folder keeps text_encoder_3, and load_sd loads it with T5 (same images)."""
    with_t5 = build_tiny_sd3(seed=0, t5=True)
    embeds, _ = FAMILIES["sd3"].encode_prompt(with_t5, ["a photo of a cat"])
    assert embeds.shape[1] == 77 + 256 and embeds[:, 77:].abs().sum() > 0
    with_t5.save_pretrained(tmp_path)
    back = load_sd(tmp_path, family="sd3")
    assert type(back.text_encoder_3).__name__ == "T5EncoderModel"
    assert abs(_sample(back) - _sample(with_t5)).max() < 1e-5


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("SD3_MEDIUM_TRANSFORMER", 2_028_328_000),
        ("SD35_MEDIUM_TRANSFORMER", 2_243_171_520),
        ("SD35_LARGE_TRANSFORMER", 8_056_627_520),
    ],
)
def test_true_size_sd3_layouts(name, params):
    """The true-size SD3/SD3.5 transformers build on the meta device with their published
    sizes (Stability's 2B / 2.5B / 8B count the position buffer too: within 5%)."""
    from idgen.models import layouts

    config = getattr(layouts, name)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    assert sum(p.numel() for p in model.parameters()) == params
    buffer = model.pos_embed.pos_embed.numel()
    published = {"SD3_": 2.0e9, "SD35_M": 2.5e9, "SD35_L": 8.1e9}
    target = next(v for k, v in published.items() if name.startswith(k))
    assert abs(params + buffer - target) / target < 0.05
