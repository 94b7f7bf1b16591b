"""FID/KID through torchmetrics, the Inception path from a local file, the reference cache."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from idgen.metrics import (
    FeatureExtractorError,
    InceptionFeatures,
    TinyFeatureExtractor,
    extractor_id,
    fid_kid,
    list_images,
)
from idgen.metrics.images import load_batch


def _write_images(folder: Path, n: int, seed: int, shift: int = 0, size: int = 32) -> Path:
    """Random blobs; ``shift`` brightens every pixel (a distribution shift)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 160, size=(size // 4, size // 4, 3)).astype(np.int32)
        img = np.kron(base, np.ones((4, 4, 1), dtype=np.int32)) + rng.integers(
            0, 30, (size, size, 3)
        )
        Image.fromarray(np.clip(img + shift, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture
def sets(tmp_path):
    real = _write_images(tmp_path / "real", 40, seed=0)
    same = _write_images(tmp_path / "same", 40, seed=0)
    small = _write_images(tmp_path / "small_shift", 40, seed=1, shift=20)
    big = _write_images(tmp_path / "big_shift", 40, seed=1, shift=80)
    return real, same, small, big


def _run(samples: Path, real: Path, extractor, **kw) -> dict:
    return fid_kid(list_images(samples), real, extractor, kid_subsets=20, kid_subset_size=30, **kw)


def test_identical_sets_give_zero_and_shift_increases(sets):
    real, same, small, big = sets
    ext = TinyFeatureExtractor(seed=0, input_size=32)
    r_same = _run(same, real, ext)
    r_small = _run(small, real, ext)
    r_big = _run(big, real, ext)
    assert abs(r_same["fid"]) < 1e-2
    assert abs(r_same["kid_mean"]) < 1e-3
    assert r_small["fid"] > 0.01 > abs(r_same["fid"]) * 100
    assert r_big["fid"] > r_small["fid"]
    assert r_big["kid_mean"] > r_small["kid_mean"] > r_same["kid_mean"]
    # the sample count is always reported beside the score
    assert r_big["num_samples"] == 40 and r_big["num_reference"] == 40
    assert "NOT comparable" in r_big["feature_input"]


def test_values_match_direct_torchmetrics(sets):
    real, _, small, _ = sets
    ext = TinyFeatureExtractor(seed=3, input_size=32)
    ours = _run(small, real, ext, seed=7)

    real_imgs = load_batch(list_images(real))
    fake_imgs = load_batch(list_images(small))
    fid = FrechetInceptionDistance(feature=ext)
    fid.update(real_imgs, real=True)
    fid.update(fake_imgs, real=False)
    kid = KernelInceptionDistance(feature=ext, subsets=20, subset_size=30)
    kid.update(real_imgs, real=True)
    kid.update(fake_imgs, real=False)
    torch.manual_seed(7)
    kid_mean, kid_std = kid.compute()

    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-4, abs=1e-4)
    assert ours["kid_mean"] == pytest.approx(float(kid_mean), rel=1e-4, abs=1e-6)
    assert ours["kid_std"] == pytest.approx(float(kid_std), rel=1e-4, abs=1e-6)


def test_kid_subset_size_capped_and_too_few_images_is_clear(tmp_path):
    real = _write_images(tmp_path / "r", 5, seed=0)
    one = _write_images(tmp_path / "one", 1, seed=1)
    ext = TinyFeatureExtractor(input_size=32)
    res = fid_kid(list_images(real), real, ext, kid_subset_size=1000)
    assert res["kid_subset_size"] == 5
    with pytest.raises(ValueError, match="at least 2 sample images"):
        fid_kid(list_images(one), real, ext)


class _Counting(torch.nn.Module):
    """Wraps an extractor and counts the images it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = 0
        self.extractor_id = inner.extractor_id

    def forward(self, x):
        self.seen += x.shape[0]
        return self.inner(x)


def test_reference_cache_hit_then_invalidated(sets, tmp_path):
    real, _, small, _ = sets
    cache = tmp_path / "cache"
    ext = _Counting(TinyFeatureExtractor(input_size=32))

    first = _run(small, real, ext, cache_dir=cache)
    assert first["reference_cache"] == "miss" and ext.seen == 80
    assert len(list(cache.glob("*.pt"))) == 1

    second = _run(small, real, ext, cache_dir=cache)
    assert second["reference_cache"] == "hit"
    assert ext.seen == 120  # only the 40 samples were extracted again
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6)

    # change one reference image: new content, size and mtime -> the cache must not be reused
    victim = sorted(real.iterdir())[0]
    Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(victim)
    os.utime(victim, ns=(1, 1))
    third = _run(small, real, ext, cache_dir=cache)
    fresh = _run(small, real, TinyFeatureExtractor(input_size=32))
    assert third["reference_cache"] == "miss"
    assert third["fid"] == pytest.approx(fresh["fid"], rel=1e-6)
    assert third["fid"] != pytest.approx(first["fid"], rel=1e-6)

    # another extractor or resolution is another key
    other = _run(small, real, TinyFeatureExtractor(seed=1, input_size=32), cache_dir=cache)
    assert other["reference_cache"] == "miss"
    resized = _run(small, real, ext, cache_dir=cache, resolution=16)
    assert resized["reference_cache"] == "miss"


def _random_inception_weights(path: Path) -> dict:
    """A random-init state dict of torch-fidelity's Inception-v3, built with no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    with (
        mock.patch.object(tf, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.fixture
def no_network(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(tf, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_inception_builds_from_local_weights_file(tmp_path, no_network):
    weights = tmp_path / "inception.pth"
    state = _random_inception_weights(weights)
    ext = InceptionFeatures(feature=2048, weights_path=weights)
    loaded = ext.net.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "fc.weight", "Mixed_7c.branch_pool.conv.weight"):
        assert torch.equal(loaded[key], state[key])
    feats = ext(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert feats.shape == (2, 2048)
    assert "299x299" in ext.description
    # the id names the weights file content, so the cache separates different weights
    assert extractor_id(ext).startswith("inception-v3-compat-2048-file-")


def test_inception_offline_without_weights_is_one_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache
    # the real config key (idgen/conf/metrics/inception.yaml), not the old metrics.fid.weights_path
    with pytest.raises(FeatureExtractorError, match="metrics.fid.extractor.weights_path=<file>"):
        InceptionFeatures()
    with pytest.raises(FeatureExtractorError, match="does not exist"):
        InceptionFeatures(weights_path=tmp_path / "missing.pth")
