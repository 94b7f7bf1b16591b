"""The toy world's pixel-statistics metrics as an idgen-eval metric (``metrics=toyworld``).

Each sample's target colour and shape are read from its prompt (PNG text chunk or
``samples.jsonl``, as for CLIP metrics): ``"a red circle"`` asks for red and circle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from idgen.metrics.evaluation import sample_prompts
from idgen.metrics.images import load_uint8
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
