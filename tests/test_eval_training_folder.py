"""idgen-eval takes the folder training took: same scan and skips, same resize + centre crop.

The reference folder mixes sizes, aspect ratios and formats and holds corrupt, empty and
non-image files, as a user's folder of photos does.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.data import DomainImageDataModule
from idgen.data.datamodule import SkippedImagesWarning
from idgen.metrics import TinyFeatureExtractor, fid_kid
from idgen.metrics.features import extract_features
from idgen.metrics.fid import fid_from_features
from idgen.metrics.images import list_images, load_uint8, scan_reference


@pytest.fixture
def user_folder(tmp_path):
    """9 good images of 5 sizes (portrait, landscape, square; PNG/JPEG/WebP) + 3 bad files."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (96, 48), (40, 80), (128, 100), (50, 50)]
    for i in range(9):
        w, h = sizes[i % len(sizes)]
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        ext = (".png", ".jpg", ".webp")[i % 3]
        image.save((root if i % 2 else root / "sub") / f"img{i}{ext}")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    good = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(root / "truncated.png")
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture
def samples(tmp_path):
    out = tmp_path / "samples"
    out.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out / f"{i}.png")
    return out


def test_scan_is_the_datamodules_scan_with_one_warning(user_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = scan_reference(user_folder)
    skipped = [w for w in caught if issubclass(w.category, SkippedImagesWarning)]
    assert len(skipped) == 1 and "Skipped 3 unusable file(s)" in str(skipped[0].message)
    dm = DomainImageDataModule(root=str(user_folder), resolution=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert files == dm.scan()
    assert len(files) == 9 and not {"corrupt.jpg", "empty.png", "truncated.png"} & {
        f.name for f in files
    }


def test_reference_images_are_the_training_pixels(user_folder):
    """Every reference image at the evaluation size equals the DataModule's training tensor."""
    dm = DomainImageDataModule(root=str(user_folder), resolution=32, batch_size=1, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    dataset = dm.val_dataset.__class__(dm.train_files, dm.val_dataset.transform)  # no flip
    for i, path in enumerate(dm.train_files):
        training = ((dataset[i]["pixel_values"] + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(load_uint8(path, 32), training), path
    # a centre crop, not a squash: a 96x48 landscape keeps its middle at the original scale
    wide = next(p for p in dm.train_files if Image.open(p).size == (96, 48))
    with Image.open(wide) as im:
        middle = np.asarray(im.convert("RGB").resize((64, 32), Image.Resampling.BICUBIC))
    # bicubic 96x48 -> 64x32, columns 16..48 are the centre 32x32 (PIL vs torch rounding: small)
    diff = np.abs(load_uint8(wide, 32).permute(1, 2, 0).numpy().astype(int) - middle[:, 16:48])
    assert np.median(diff) <= 2


def test_fid_against_the_training_folder(user_folder, samples, tmp_path):
    """Corrupt files skipped, mixed sizes read at the samples' size, value = closed-form FID."""
    ext = TinyFeatureExtractor(seed=0, input_size=32)
    paths = list_images(samples)
    with pytest.warns(SkippedImagesWarning, match="Skipped 3"):
        result = fid_kid(paths, user_folder, ext, cache_dir=tmp_path / "cache", kid=False)
    assert result["num_reference"] == 9 and result["num_samples"] == 6
    assert result["resolution"] == 32  # the samples' size
    files = scan_reference(user_folder)
    real = torch.stack([load_uint8(f, 32) for f in files])
    expected = fid_from_features(ext(real).float(), extract_features(ext, paths, 32))
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    # second run: reference statistics from the cache, same value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = fid_kid(paths, user_folder, ext, cache_dir=tmp_path / "cache", kid=False)
    assert again["reference_cache"] == "hit" and again["fid"] == result["fid"]
