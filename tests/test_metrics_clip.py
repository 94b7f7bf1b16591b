"""CLIP score and attribute alignment with a tiny local CLIP model (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from idgen.metrics import (
    Attribute,
    CLIPLoadError,
    attribute_alignment,
    clip_loader,
    clip_score,
    load_clip,
)
from idgen.models.tiny_clip import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 48, 48), generator=g, dtype=torch.uint8) for _ in range(n)]


@torch.no_grad()
def _direct_cosines(folder, images, texts) -> torch.Tensor:
    """cos(image_i, text_j) straight from transformers, no torchmetrics or idgen code."""
    model = CLIPModel.from_pretrained(folder).eval()
    proc = CLIPProcessor.from_pretrained(folder)
    pix = proc(images=list(images), return_tensors="pt")["pixel_values"]
    tok = proc(text=list(texts), return_tensors="pt", padding=True)
    img = model.get_image_features(pixel_values=pix).pooler_output
    txt = model.get_text_features(
        input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
    ).pooler_output
    return torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T


PROMPTS = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a green triangle",
    "a yellow shape",
]


def test_clip_score_matches_closed_form(tiny_clip_dir):
    images = _images(8)
    prompts = [PROMPTS[i % 4] for i in range(8)]
    cos = _direct_cosines(tiny_clip_dir, images, PROMPTS)
    expected = torch.stack([cos[i, i % 4] for i in range(8)])
    expected = (100 * expected).clamp(min=0).mean()
    assert float(expected) > 0  # the check is not vacuous (all-clamped would give 0 == 0)
    ours = clip_score(images, prompts, clip_loader(tiny_clip_dir), batch_size=3)
    assert ours == pytest.approx(float(expected), rel=1e-4)


def test_attribute_alignment_matches_direct_decision(tiny_clip_dir):
    attrs = [
        Attribute("a photo of a face, smiling", "a photo of a smiling face", "a photo of a face"),
        Attribute("a photo of a face, old", "a photo of an old face", "a photo of a young face"),
    ]
    images = _images(10, seed=1)
    prompts = [attrs[0].prompt] * 6 + [attrs[1].prompt] * 3 + ["something else"]
    model, proc = load_clip(tiny_clip_dir)
    res = attribute_alignment(images, prompts, attrs, model, proc, batch_size=4)

    cos0 = _direct_cosines(tiny_clip_dir, images[:6], [attrs[0].positive, attrs[0].negative])
    cos1 = _direct_cosines(tiny_clip_dir, images[6:9], [attrs[1].positive, attrs[1].negative])
    hits0 = int((cos0[:, 0] > cos0[:, 1]).sum())
    hits1 = int((cos1[:, 0] > cos1[:, 1]).sum())
    assert res["attribute_per_prompt"][attrs[0].prompt] == {
        "alignment": hits0 / 6,
        "num_samples": 6,
    }
    assert res["attribute_per_prompt"][attrs[1].prompt] == {
        "alignment": hits1 / 3,
        "num_samples": 3,
    }
    assert res["attribute_alignment"] == pytest.approx((hits0 + hits1) / 9)
    assert res["attribute_num_samples"] == 9
    assert res["attribute_unmatched_prompts"] == ["something else"]

    # identical positive/negative captions can never be "strictly closer": alignment 0
    same = [Attribute(attrs[0].prompt, "a photo of a face", "a photo of a face")]
    assert (
        attribute_alignment(images[:6], prompts[:6], same, model, proc)["attribute_alignment"] == 0
    )


def test_missing_clip_folder_is_clear(tmp_path):
    with pytest.raises(CLIPLoadError, match="no config.json"):
        load_clip(tmp_path)
