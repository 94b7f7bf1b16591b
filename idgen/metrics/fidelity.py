"""FID/KID of a set of sample images against a reference folder, with cached reference features."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from idgen.metrics.cache import cache_path, load_cached, reference_key, save_cached
from idgen.metrics.features import describe, extract_features, extractor_id
from idgen.metrics.fid import fid_from_features, kid_from_features
from idgen.metrics.images import image_size, scan_reference

log = logging.getLogger(__name__)


def reference_features(
    reference_dir: str | os.PathLike,
    extractor: nn.Module,
    resolution: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    scan_cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, dict]:
    """Features of every usable image in ``reference_dir``, from the cache when the key matches.

    The folder is scanned like training's ``data.root`` (unusable files skipped with one
    warning) and each image resized and centre-cropped to ``resolution`` like training does.
    Returns (features [N, D], info) where info records the cache outcome and file.
    """
    files = scan_reference(reference_dir, scan_cache_dir)
    ident = extractor_id(extractor)
    info: dict = {"reference_dir": str(reference_dir), "num_reference": len(files), "cache": "off"}
    desc = f"reference features ({len(files)} images)"
    if cache_dir is None:
        return extract_features(extractor, files, resolution, batch_size, device, desc), info
    key = reference_key(reference_dir, files, resolution, ident)
    info["cache_file"] = str(cache_path(cache_dir, key))
    cached = load_cached(cache_dir, key)
    if cached is not None:
        info["cache"] = "hit"
        return cached, info
    features = extract_features(extractor, files, resolution, batch_size, device, desc)
    meta = {"extractor": ident, "resolution": resolution, "num_files": len(files)}
    save_cached(cache_dir, key, features, meta)
    info["cache"] = "miss"
    log.info("cached reference features of %d images in %s", len(files), info["cache_file"])
    return features, info


def fid_kid(
    sample_paths: Sequence[Path],
    reference_dir: str | os.PathLike,
    extractor: nn.Module,
    resolution: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    scan_cache_dir: str | os.PathLike | None = None,
) -> dict:
    """FID (and KID) of ``sample_paths`` vs ``reference_dir``; sample counts reported beside them.

    ``resolution=None`` evaluates at the samples' size (the short side of the first sample):
    the reference images, whatever their sizes, are resized and centre-cropped to it.
    """
    if resolution is None and sample_paths:
        resolution = min(image_size(sample_paths[0]))
        log.info("evaluation resolution %d (the samples' size)", resolution)
    real, info = reference_features(
        reference_dir, extractor, resolution, cache_dir, batch_size, device, scan_cache_dir
    )
    fake = extract_features(
        extractor, list(sample_paths), resolution, batch_size, device, "sample features"
    )
    result = {
        "fid": fid_from_features(real, fake),
        "num_samples": int(fake.shape[0]),
        "num_reference": int(real.shape[0]),
        "feature_extractor": extractor_id(extractor),
        "feature_input": describe(extractor),
        "resolution": resolution,
        "reference_cache": info["cache"],
        "reference_transform": "resize short side + centre crop (as training)",
    }
    if kid:
        mean, std, size = kid_from_features(real, fake, kid_subsets, kid_subset_size, seed)
        result.update(kid_mean=mean, kid_std=std, kid_subsets=kid_subsets, kid_subset_size=size)
    return result
