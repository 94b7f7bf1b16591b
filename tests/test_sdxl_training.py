"""SDXL stages 1 and 2 on the tiny SDXL: the inverted (F^T, pooled) and each image's time_ids
reach the UNet exactly as diffusers' SDXL pipeline feeds them; the null-text SDXL UNet is the
source UNet when attention has nothing to choose (one token), round-trips, and refuses to load
as a plain UNet."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from idgen.data import DomainImageDataModule
from idgen.models import FAMILIES, NullTextUNet, build_tiny_sdxl
from idgen.modules import NullTextFinetuneModule, TextFeatureInversionModule
from idgen.modules.sd_parts import load_pooled_features, load_text_features
from tests.conftest import quiet_trainer

XL = FAMILIES["sdxl"]


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl(seed=0)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (64, 80), (64, 64), (72, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return DomainImageDataModule(str(root), resolution=64, batch_size=2, center_crop=False)


def _record_unet_inputs(unet) -> list[dict]:
    seen: list[dict] = []

    def hook(_module, args, kwargs):
        seen.append({k: v for k, v in kwargs.items() if k != "cross_attention_kwargs"})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _expected_time_ids(batch) -> torch.Tensor:
    rows = [
        [*o.tolist(), *c.tolist(), *t.tolist()]
        for o, c, t in zip(
            batch["original_size"], batch["crop_top_left"], batch["target_size"], strict=True
        )
    ]
    return torch.tensor(rows, dtype=torch.float32)


def test_stage1_sdxl_inverts_both_features_with_each_images_time_ids(tmp_path, sdxl, images):
    pipe = build_tiny_sdxl(seed=0)
    seen = _record_unet_inputs(pipe.unet)
    module = TextFeatureInversionModule(
        model_loader=lambda: pipe,
        optimizer=functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.0),
        domain="cat",
        output_dir=str(tmp_path / "out"),
    )
    batches = []
    module.on_train_batch_start = lambda batch, i: batches.append(batch)
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=images)

    # initialised from the prompt as diffusers' SDXL pipeline encodes it
    embeds, pooled = XL.encode_prompt(sdxl, ["a photo of cat"])
    assert torch.equal(module.initial_features, embeds)
    assert module.text_features.shape == (1, 77, 64) and module.pooled_features.shape == (1, 32)
    assert not torch.equal(module.pooled_features.detach(), pooled)  # trained
    # the UNet got the features, the pooled features and each training image's time_ids
    assert len(seen) == 2
    for batch, call in zip(batches, seen, strict=True):
        ids = call["added_cond_kwargs"]["time_ids"]
        assert torch.equal(ids, _expected_time_ids(batch))
        assert call["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert {tuple(b["original_size"][0].tolist()) for b in batches} <= {
        (64, 96),
        (80, 64),
        (64, 64),
        (64, 72),
    }
    # the export holds both
    path = tmp_path / "out" / "text_features.safetensors"
    torch.testing.assert_close(load_text_features(path), module.text_features.detach())
    torch.testing.assert_close(load_pooled_features(path), module.pooled_features.detach())


def test_null_text_sdxl_unet_is_the_source_with_one_token(sdxl):
    """With a single context token the softmax is 1, so attn2 = to_out(to_v(F)) = E_l exactly:
    the null-text UNet must equal the source UNet fed that token and the pooled vector."""
    g = torch.Generator().manual_seed(0)
    token = torch.randn(1, 1, 64, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    null = NullTextUNet.from_unet(sdxl.unet, token, pooled_features=pooled)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ids = torch.tensor([[64.0, 96, 0, 16, 64, 64], [80, 64, 8, 0, 64, 64]])
    with torch.no_grad():
        ours = null(x, t, time_ids=ids).sample
        added = {"text_embeds": pooled.expand(2, -1), "time_ids": ids}
        ref = sdxl.unet(
            x, t, encoder_hidden_states=token.expand(2, -1, -1), added_cond_kwargs=added
        )
    torch.testing.assert_close(ours, ref.sample, atol=1e-5, rtol=1e-5)
    # time_ids stay a real input: other sizes, another prediction
    with torch.no_grad():
        other = null(x, t, time_ids=ids * 2).sample
    assert (other - ours).abs().max() > 1e-4
    with pytest.raises(ValueError, match="time_ids"):
        null(x, t)
    with pytest.raises(ValueError, match="pooled_features"):
        NullTextUNet.from_unet(sdxl.unet, token)


def test_null_text_sdxl_round_trip_and_loud_misload(tmp_path, sdxl):
    embeds, pooled = XL.encode_prompt(sdxl, ["a photo of cat"])
    null = NullTextUNet.from_unet(sdxl.unet, embeds, pooled_features=pooled)
    torch.testing.assert_close(null.pooled_embedding, pooled[0])
    assert len(null.embedding_parameters()) == 1 + sum(
        1 for n, _ in null.named_parameters() if n.endswith("domain_embedding")
    )
    null.save_pretrained(tmp_path / "d")
    back = NullTextUNet.from_pretrained(tmp_path / "d")
    for (n, a), (_, b) in zip(null.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(Exception):  # noqa: B017 - any loud failure, never a silent default UNet
        UNet2DConditionModel.from_pretrained(tmp_path / "d")


def test_stage2_sdxl_trains_with_time_ids_and_exports(tmp_path, images):
    pipe = build_tiny_sdxl(seed=0)
    module = NullTextFinetuneModule(
        model_loader=lambda: pipe,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        domain="cat",
        output_dir=str(tmp_path / "out"),
    )
    batches = []
    module.on_train_batch_start = lambda batch, i: batches.append(batch)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    module.setup("fit")
    seen = _record_unet_inputs(module.domain_unet.unet)
    start = module.domain_unet.pooled_embedding.detach().clone()
    trainer.fit(module, datamodule=images)
    assert len(seen) == 2
    for batch, call in zip(batches, seen, strict=True):
        assert torch.equal(call["added_cond_kwargs"]["time_ids"], _expected_time_ids(batch))
    assert not torch.equal(module.domain_unet.pooled_embedding.detach(), start)
    back = NullTextUNet.from_pretrained(tmp_path / "out" / "domain_model")
    assert back.pooled_embedding is not None


def test_calibrated_init_on_sdxl_gets_each_images_time_ids(tmp_path, images):
    data = DomainImageDataModule(images.root, resolution=64, batch_size=2)  # centre crops
    pipe = build_tiny_sdxl(seed=0)
    seen = _record_unet_inputs(pipe.unet)
    module = NullTextFinetuneModule(
        model_loader=lambda: pipe,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        domain="cat",
        init="calibrated",
        calibration_batches=2,
        output_dir=str(tmp_path / "out"),
    )
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    # the source UNet ran over the first two batches with their size conditioning
    first = [b for _, b in zip(range(2), data.train_dataloader(), strict=False)]
    expected = torch.cat([_expected_time_ids(b) for b in first])
    assert torch.equal(seen[0]["added_cond_kwargs"]["time_ids"], expected)
    assert seen[0]["added_cond_kwargs"]["text_embeds"].shape == (4, 32)
    assert len({tuple(r) for r in expected.tolist()}) > 1  # the images' sizes differ


def test_calibrated_equals_value_for_one_token_on_sdxl(sdxl):
    """One context token: attention has nothing to choose, so the mean attn2 output is
    to_out(to_v(F)) at every position: the calibrated E_l equal the value E_l."""
    g = torch.Generator().manual_seed(0)
    token, pooled = torch.randn(1, 1, 64, generator=g), torch.randn(1, 32, generator=g)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(4, -1)
    value = NullTextUNet.from_unet(sdxl.unet, token, pooled_features=pooled)
    calibrated = NullTextUNet.from_unet(
        sdxl.unet,
        token,
        init="calibrated",
        calibration_latents=latents,
        calibration_time_ids=ids,
        pooled_features=pooled,
    )
    for a, b in zip(value.embedding_parameters(), calibrated.embedding_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
