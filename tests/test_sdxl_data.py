"""SDXL micro-conditioning in the data: each image's original size, crop corner and target size,
checked against the pixels (the crop recorded is where torchvision's resize + crop cut)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from idgen.data import DomainImageDataModule, DomainImageDataset
from idgen.data.transforms import build_image_transform
from idgen.models import build_tiny_sdxl


def _noise_image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("center", [True, False])
def test_recorded_crop_is_where_the_pixels_come_from(tmp_path, center):
    _noise_image(tmp_path / "wide.png", 50, 20, 0)
    _noise_image(tmp_path / "tall.png", 16, 40, 1)
    ds = DomainImageDataset(sorted(tmp_path.glob("*.png")), build_image_transform(16, center))
    for i, path in enumerate(ds.files):
        torch.manual_seed(i)
        item = ds[i]
        image = Image.open(path)
        assert item["original_size"].tolist() == [image.height, image.width]
        assert item["target_size"].tolist() == [16, 16]
        resized = T.Resize(16, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(
            T.PILToTensor()(image)
        )
        top, left = item["crop_top_left"].tolist()
        expected = resized[:, top : top + 16, left : left + 16].float() / 127.5 - 1
        assert torch.allclose(item["pixel_values"], expected, atol=1e-5)
        if center:  # torchvision's CenterCrop gives the same pixels
            assert torch.equal(
                T.CenterCrop(16)(resized), resized[:, top : top + 16, left : left + 16]
            )


def test_cached_latents_keep_the_micro_conditioning(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        _noise_image(root / f"{i}.png", 24 + 8 * i, 16, i)
    plain = DomainImageDataModule(str(root), resolution=16, batch_size=3)
    plain.setup("fit")
    cached = DomainImageDataModule(
        str(root),
        resolution=16,
        batch_size=3,
        cache_latents=True,
        latent_cache_dir=str(tmp_path / "c"),
    )
    cached.setup("fit")
    cached.attach_vae(build_tiny_sdxl().vae, model_id="tiny_sdxl")
    a = next(iter(plain.train_dataloader()))
    b = next(iter(cached.train_dataloader()))
    assert "latent_params" in b
    for key in ("original_size", "crop_top_left", "target_size"):
        assert torch.equal(a[key], b[key]), key
    assert sorted(a["original_size"][:, 1].tolist()) == [24, 32, 40]
