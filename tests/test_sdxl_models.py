"""SDXL as a model family: the tiny SDXL, prompt encoding as diffusers does it, folders
recognised from model_index.json and refused (one line, before loading) under the wrong family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from idgen.models import (
    FAMILIES,
    FamilyError,
    build_tiny_sd,
    build_tiny_sdxl,
    family_of,
    load_sd,
)


@pytest.fixture(scope="module")
def tiny_xl():
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory, tiny_xl):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_xl.save_pretrained(folder)
    return folder


def test_tiny_sdxl_layout(tiny_xl):
    assert type(tiny_xl) is StableDiffusionXLPipeline
    assert tiny_xl.unet.config.addition_embed_type == "text_time"
    assert type(tiny_xl.text_encoder).__name__ == "CLIPTextModel"
    assert type(tiny_xl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # the context is both encoders' width, the added embedding takes pooled + 6 time ids
    width = tiny_xl.text_encoder.config.hidden_size + tiny_xl.text_encoder_2.config.hidden_size
    assert tiny_xl.unet.config.cross_attention_dim == width
    added = tiny_xl.unet.add_embedding.linear_1.in_features
    assert added == 6 * tiny_xl.unet.config.addition_time_embed_dim + (
        tiny_xl.text_encoder_2.config.projection_dim
    )
    same = build_tiny_sdxl(seed=0)
    for a, b in zip(tiny_xl.unet.parameters(), same.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sdxl_prompt_encoding_is_diffusers(tiny_xl):
    """The family's encoding: hidden_states[-2] of both encoders concatenated, pooled = encoder
    2's projection (computed here by hand from the encoders)."""
    texts = ["a photo of a cat", "a red circle"]
    embeds, pooled = FAMILIES["sdxl"].encode_prompt(tiny_xl, texts)
    parts = []
    for tok, enc in (
        (tiny_xl.tokenizer, tiny_xl.text_encoder),
        (tiny_xl.tokenizer_2, tiny_xl.text_encoder_2),
    ):
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = enc(ids.input_ids, output_hidden_states=True)
        parts.append(out.hidden_states[-2])
    assert torch.allclose(embeds, torch.cat(parts, dim=-1), atol=1e-6)
    assert torch.allclose(pooled, out.text_embeds, atol=1e-6)
    # SDXL's unconditional branch: zeros (force_zeros_for_empty_prompt), not the encoding of ""
    u, up = FAMILIES["sdxl"].uncond_embeds(tiny_xl, embeds, pooled)
    assert not u.any() and not up.any() and u.shape == embeds.shape


def test_time_ids_per_image():
    ids = FAMILIES["sdxl"].time_ids(
        torch.tensor([[100, 80], [64, 64]]), torch.tensor([[10, 0], [0, 0]]), torch.tensor([64, 64])
    )
    assert ids.tolist() == [[100, 80, 10, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert FAMILIES["sd15"].time_ids(None, None, None) is None


def test_family_of_pipelines_folders_unets(tiny_xl, xl_folder, tmp_path):
    sd = build_tiny_sd()
    assert family_of(tiny_xl).name == "sdxl" and family_of(sd).name == "sd15"
    assert family_of(tiny_xl.unet).name == "sdxl" and family_of(sd.unet).name == "sd15"
    assert family_of(xl_folder).name == "sdxl"
    sd.save_pretrained(tmp_path / "sd15")
    assert family_of(tmp_path / "sd15").name == "sd15"


def test_load_sd_sdxl_round_trip(tiny_xl, xl_folder):
    pipe = load_sd(xl_folder, family="sdxl")
    assert type(pipe) is StableDiffusionXLPipeline
    kw = dict(num_inference_steps=2, output_type="np")
    a = tiny_xl("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-5


def test_wrong_family_folder_is_refused_before_loading(xl_folder, tmp_path, monkeypatch):
    # An SDXL folder with model=sd15: named from model_index.json, before from_pretrained runs.
    called = []
    monkeypatch.setattr(
        FAMILIES["sd15"].txt2img, "from_pretrained", lambda *a, **k: called.append(1)
    )
    with pytest.raises(
        FamilyError, match=r"is a sdxl folder \(StableDiffusionXLPipeline\).*model=sdxl"
    ):
        load_sd(xl_folder, family="sd15")
    assert not called
    # and the reverse: an SD1.5 folder with model=sdxl
    build_tiny_sd().save_pretrained(tmp_path / "sd15")
    with pytest.raises(
        FamilyError, match=r"sd15 folder \(StableDiffusionPipeline\).*model.family=sdxl"
    ):
        load_sd(tmp_path / "sd15", family="sdxl")


def test_incomplete_sdxl_folder_names_the_second_encoder(xl_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(xl_folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(Exception, match="text_encoder_2/"):
        load_sd(broken, family="sdxl")
    index = json.loads((broken / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
