"""The toy world's pixel-statistics metrics as idgen-eval metrics (``metrics=toyworld``).

Each sample's target colour and shape are read from its prompt (PNG text chunk or
``samples.jsonl``, as for CLIP metrics): ``"a red circle"`` asks for red and circle.
``metrics=toyworld_spatial`` adds the spatial alignment of ControlNet samples: the IoU of each
sample's foreground with its condition mask (``idgen.toyworld.conditions``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from idgen.metrics.evaluation import sample_prompts
from idgen.metrics.images import ImageFolderError, load_uint8, png_text
from idgen.toyworld.conditions import mask_iou
from idgen.toyworld.metrics import read_image
from idgen.toyworld.render import COLOURS, SHAPES


def named(prompt: str, vocabulary: Sequence[str]) -> str | None:
    """The one word of ``vocabulary`` the prompt names, or None when it names none or several."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    found = [w for w in vocabulary if w in words]
    return found[0] if len(found) == 1 else None


def toy_scores(images: Sequence, prompts: Sequence[str]) -> dict[str, float]:
    """Colour/shape accuracy (over samples whose prompt names one), no-object rate, dark fraction.

    ``images``: HxWx3 uint8 arrays. No object counts as a wrong colour and shape.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if not images:
        raise ValueError("toy-world metrics need at least one sample")
    readings = [read_image(image) for image in images]
    n = len(readings)
    results = {
        "toyworld_num_samples": n,
        "dark_fraction": sum(r.dark for r in readings) / n,
        "no_object_rate": sum(r.colour is None for r in readings) / n,
    }
    for key, vocabulary in (("colour", tuple(COLOURS)), ("shape", SHAPES)):
        pairs = [
            (getattr(r, key), named(p, vocabulary)) for r, p in zip(readings, prompts, strict=True)
        ]
        pairs = [(seen, asked) for seen, asked in pairs if asked is not None]
        if pairs:
            results[f"{key}_accuracy"] = sum(seen == asked for seen, asked in pairs) / len(pairs)
            results[f"{key}_num_samples"] = len(pairs)
    return results


class ToyWorldMetrics:
    """``metric(sample_paths, samples_dir)`` -> toy-world scores, for ``evaluate_folder``."""

    def __call__(self, paths: Sequence[Path], samples_dir: Path) -> dict[str, float]:
        prompts = sample_prompts(samples_dir, paths)
        images = [load_uint8(p).permute(1, 2, 0).numpy() for p in paths]
        return toy_scores(images, prompts)


class ToyMaskAlignment:
    """``metric(sample_paths, samples_dir)`` -> mean mask IoU of ControlNet samples.

    A sample's condition is the ``sampler.control_image`` that idgen-sample recorded in it (PNG
    text chunk ``idgen``); with ``conditions_dir``, that file name is looked up there instead
    (folders that moved), and a sample without a record is paired with the condition of the
    same file stem.
    """

    def __init__(self, conditions_dir: str | os.PathLike | None = None):
        self.conditions_dir = Path(conditions_dir) if conditions_dir else None

    def condition_of(self, path: Path) -> Path:
        record = png_text(path).get("idgen") if path.suffix.lower() == ".png" else None
        recorded = json.loads(record).get("sampler", {}).get("control_image") if record else None
        if isinstance(recorded, list):
            recorded = recorded[0] if len(recorded) == 1 else None
        if self.conditions_dir is not None:
            name = Path(recorded).name if recorded else f"{path.stem}.png"
            candidate = self.conditions_dir / name
        else:
            candidate = Path(recorded) if recorded else None
        if candidate is None or not candidate.is_file():
            raise ImageFolderError(
                f"no condition mask for sample '{path}' (looked for {candidate}): sample it with "
                "idgen-sample sampler.control_image=<mask>, or set "
                "metrics.extra.mask_alignment.conditions_dir=<folder of masks named like the samples>."
            )
        return candidate

    def __call__(self, paths: Sequence[Path], samples_dir: Path) -> dict[str, float]:
        if not paths:
            raise ValueError("mask alignment needs at least one sample")
        ious = [
            mask_iou(
                load_uint8(p).permute(1, 2, 0).numpy(),
                load_uint8(self.condition_of(p)).permute(1, 2, 0).numpy(),
            )
            for p in paths
        ]
        return {"mask_iou": float(np.mean(ious)), "mask_iou_num_samples": len(ious)}
