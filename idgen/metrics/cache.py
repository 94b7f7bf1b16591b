"""On-disk cache of reference-set features, keyed by what they depend on.

The key hashes the reference file list (relative path, size, mtime), the resolution the
images are read at and the feature extractor id, so editing, adding or removing a reference
image, or changing the extractor, gives a new key (a miss) instead of stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from idgen.utils.io import atomic_torch_save, remove_stale_temps

# How reference images are read; part of the key, so features read another way are a miss.
TRANSFORM = "resize-short-side+center-crop/v1"


def reference_key(
    root: str | os.PathLike, files: Sequence[Path], resolution: int | None, extractor: str
) -> str:
    """Hex digest over (file list with sizes and mtimes, resolution, transform, extractor id)."""
    root = Path(root)
    entries = []
    for path in files:
        stat = os.stat(path)
        entries.append([Path(path).relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps(
        {
            "files": entries,
            "resolution": resolution,
            "transform": TRANSFORM,
            "extractor": extractor,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


CACHE_GLOB = "reference-features-*.pt"  # every cache file's name (cache_path)


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / CACHE_GLOB.replace("*", key[:24])


def load_cached(cache_dir: str | os.PathLike, key: str) -> torch.Tensor | None:
    """Cached features for ``key``, or None (missing, unreadable or for another key).

    First the temp files of cache writes a kill interrupted (``.reference-features-*.pt.*.tmp``
    older than this run, their writer gone) are removed: no later run would otherwise.
    """
    remove_stale_temps(cache_dir, CACHE_GLOB)
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt cache file is just a miss; it is rewritten below
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    return entry["features"]


def save_cached(cache_dir: str | os.PathLike, key: str, features: torch.Tensor, meta: dict) -> Path:
    path = cache_path(cache_dir, key)
    atomic_torch_save({"key": key, "features": features.contiguous(), "meta": meta}, path)
    return path
