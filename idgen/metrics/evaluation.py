"""Evaluate a folder of samples: FID/KID, CLIP score, attribute alignment, canny discrepancy.

Plain functions over folders and objects (no Hydra), so ``idgen.evaluate`` stays a thin
entry point and notebooks can call the same code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from idgen.metrics.canny import canny_discrepancy
from idgen.metrics.clip import Attribute, attribute_alignment, clip_loader, clip_score, load_clip
from idgen.metrics.fidelity import fid_kid
from idgen.metrics.images import ImageFolderError, list_images, load_uint8, png_text
from idgen.metrics.manifest import SAMPLES_INDEX, find_manifest, images_to_score

log = logging.getLogger(__name__)


def sample_prompts(samples_dir: str | os.PathLike, paths: Sequence[Path]) -> list[str]:
    """The prompt of each sample: PNG text chunk ``prompt``, else ``samples.jsonl``; clear error if none."""
    manifest = find_manifest(samples_dir)
    index = manifest.prompts() if manifest is not None else {}
    prompts = []
    for path in paths:
        prompt = png_text(path).get("prompt") if path.suffix.lower() == ".png" else None
        prompt = prompt if prompt is not None else index.get(path.name)
        if prompt is None:
            raise ImageFolderError(
                f"no prompt known for sample '{path}': CLIP metrics need each sample's prompt in a PNG "
                f"text chunk 'prompt' or in {SAMPLES_INDEX} (idgen-sample writes both)."
            )
        prompts.append(prompt)
    return prompts


def match_conditions(
    sample_paths: Sequence[Path], conditions_dir: str | os.PathLike
) -> list[tuple[Path, Path]]:
    """Pair each sample with its control condition.

    A sample's condition is named by its PNG text chunk ``control_image`` (file name looked up
    in ``conditions_dir``) or, failing that, is the condition with the same file stem.
    """
    conditions = list_images(conditions_dir, "canny conditions folder")
    by_name = {p.name: p for p in conditions}
    by_stem = {p.stem: p for p in conditions}
    pairs, missing = [], []
    for path in sample_paths:
        named = png_text(path).get("control_image") if path.suffix.lower() == ".png" else None
        cond = by_name.get(Path(named).name) if named else None
        cond = cond or by_stem.get(path.stem)
        if cond is None:
            missing.append(path.name)
        else:
            pairs.append((path, cond))
    if missing:
        raise ImageFolderError(
            f"{len(missing)} samples have no condition in '{conditions_dir}' (e.g. {missing[:3]}): "
            "name conditions like the samples (same stem) or write a PNG text chunk 'control_image'."
        )
    return pairs


def canny_metrics(
    pairs: Sequence[tuple[Path, Path]],
    low: int = 100,
    high: int = 200,
    condition_is_edges: bool = True,
) -> dict:
    scores = [
        canny_discrepancy(
            load_uint8(s).permute(1, 2, 0).numpy(),
            load_uint8(c).permute(1, 2, 0).numpy(),
            low,
            high,
            condition_is_edges,
        )
        for s, c in pairs
    ]
    return {
        "canny_discrepancy": float(np.mean(scores)),
        "canny_num_samples": len(scores),
        "canny_definition": (
            f"mean over samples of the fraction of pixels where cv2.Canny(gray(sample), {low}, {high}) "
            "and the condition's edges (condition > 127) disagree; lower is better"
        ),
    }


def clip_metrics(
    samples_dir: str | os.PathLike,
    paths: Sequence[Path],
    clip_model: str | os.PathLike,
    attributes: Sequence[Attribute] | None,
    resolution: int | None,
    batch_size: int,
    device: str | torch.device,
) -> dict:
    """CLIP score of each sample with its own prompt and, given ``attributes``, attribute alignment."""
    prompts = sample_prompts(samples_dir, paths)
    images = [load_uint8(p, resolution) for p in paths]
    results: dict = {
        "clip_score": clip_score(images, prompts, clip_loader(clip_model), batch_size, device),
        "clip_num_samples": len(images),
        "clip_model": str(clip_model),
    }
    if attributes:
        model, processor = load_clip(clip_model)
        results.update(
            attribute_alignment(images, prompts, attributes, model, processor, batch_size, device)
        )
    return results


def condition_canny_metrics(paths: Sequence[Path], canny_options: dict) -> dict:
    """Canny discrepancy of each sample against its control condition.

    ``canny_options`` holds ``conditions_dir`` (required: clear error if unset) and
    :func:`canny_metrics`' ``low``, ``high``, ``condition_is_edges``.
    """
    opts = dict(canny_options)
    if not opts.get("conditions_dir"):
        raise ValueError(
            "canny discrepancy needs metrics.canny.conditions_dir=<folder of canny conditions>."
        )
    pairs = match_conditions(paths, opts.pop("conditions_dir"))
    return canny_metrics(pairs, **opts)


def extra_suite_metrics(
    paths: list[Path],
    samples_dir: Path,
    extra_metrics: Sequence[Callable[[list[Path], Path], dict]],
) -> dict:
    """The merged results of each ``metric(paths, samples_dir)`` of ``extra_metrics``, in order."""
    results: dict = {}
    for metric in extra_metrics:
        results.update(metric(paths, samples_dir))
    return results


def evaluate_folder(
    samples_dir: str | os.PathLike,
    reference_dir: str | os.PathLike | None = None,
    extractor: nn.Module | None = None,
    fid_options: dict | None = None,
    clip_model: str | os.PathLike | None = None,
    attributes: Sequence[Attribute] | None = None,
    canny_options: dict | None = None,
    resolution: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    extra_metrics: Sequence[Callable[[list[Path], Path], dict]] | None = None,
    scan_cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Every configured metric of the images in ``samples_dir``; counts reported beside scores.

    With idgen-sample's manifest (``samples.jsonl``) exactly the images it lists are scored;
    other image files there are counted (``num_ignored_files``), logged and left on disk.

    ``extractor`` (with ``reference_dir``) enables FID/KID, ``clip_model`` CLIP score and, with
    ``attributes``, attribute alignment; ``canny_options`` (``conditions_dir``, ``low``, ``high``)
    the canny discrepancy. Each of ``extra_metrics`` is called as ``metric(sample_paths,
    samples_dir)`` and returns a dict merged into the results (e.g. the toy world's pixel metrics).
    ``reference_dir`` is read like training's ``data.root`` (scan, skips, resize + centre crop at
    ``resolution``, by default the samples' size); ``scan_cache_dir`` shares training's scan cache.
    """
    # the images of the current sampling plan (its manifest), not stale files beside them
    scored = images_to_score(samples_dir)
    paths = scored.paths
    results: dict = {"samples_dir": str(samples_dir), "num_samples": len(paths)}
    results.update(scored.summary())

    # 1. FID / KID against the reference folder (reference features cached)
    if extractor is not None:
        if reference_dir is None:
            raise ValueError("FID/KID need reference_dir=<folder of domain images>.")
        fid = fid_kid(paths, reference_dir, extractor, resolution, cache_dir, batch_size, device,
                      seed=seed, scan_cache_dir=scan_cache_dir, **dict(fid_options or {}))  # fmt: skip
        results.update(fid)

    # 2. CLIP score of each sample with its own prompt, and attribute alignment
    if clip_model is not None:
        results.update(
            clip_metrics(samples_dir, paths, clip_model, attributes, resolution, batch_size, device)
        )
    elif attributes:
        raise ValueError("attribute alignment needs a CLIP model: set metrics.clip.model.")

    # 3. canny discrepancy against the control conditions
    if canny_options is not None:
        results.update(condition_canny_metrics(paths, canny_options))

    # 4. metrics of other suites (idgen/conf/metrics/*.yaml `extra`)
    results.update(extra_suite_metrics(paths, Path(samples_dir), extra_metrics or ()))
    return results
