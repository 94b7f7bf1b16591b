"""Writes samples: one PNG per image (parameters in text chunks), an index, grids.

Layout under ``out_dir``::

    samples/p{prompt:04d}_{index:06d}.png   one per image, written atomically
    samples.jsonl                          the manifest: one record per finished image of
                                           the current plan, in index order
    grids/p{prompt:04d}_<prompt words>.png the images of each prompt side by side

An image is done when its PNG exists and carries the same parameter hash, prompt and seed: a
rerun skips it. Stray temp files of a killed run are removed; nothing finished is rewritten.
The manifest is rewritten atomically when a run starts and when it ends, so it always describes
the current plan: PNGs of an earlier plan in the same folder (a rerun with fewer images per
prompt, other prompts or settings) stay on disk but are not listed, and idgen-eval scores
exactly what it lists.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from PIL import Image

from idgen.sampling.plan import SamplingPlan
from idgen.utils.images import make_grid
from idgen.utils.io import atomic_write_text, save_image_atomic
from idgen.utils.log_media import log_images

log = logging.getLogger(__name__)


def grid_name(index: int, prompt: str, max_chars: int = 60) -> str:
    """``p0002_a-photo-of-a-face.png``: the prompt's index (order, uniqueness) and its words."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_chars].rstrip("-")
    return f"p{index:04d}_{words or 'empty'}.png"


PARAMS_KEY = "idgen"  # PNG text chunk holding the JSON record
MANIFEST = "samples.jsonl"  # the current plan's finished images (idgen-eval scores these)
HASH_KEY = "idgen_params_hash"


class SampleWriter:
    """PNGs with metadata, ``samples.jsonl`` and per-prompt grids for one :class:`SamplingPlan`."""

    def __init__(
        self,
        out_dir: str | Path,
        plan: SamplingPlan,
        params: dict[str, Any],
        params_hash: str,
        images_subdir: str = "samples",
        grids: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.images_dir = self.out_dir / images_subdir
        self.plan = plan
        self.params = params
        self.params_hash = params_hash
        self.grids = grids

    def path_for(self, index: int) -> Path:
        return self.images_dir / self.plan.file_name(index)

    def is_done(self, index: int) -> bool:
        """A finished image: the PNG exists (atomic writes: never partial) with our parameters."""
        path = self.path_for(index)
        if not path.is_file():
            return False
        item = self.plan.item(index)
        expected = {HASH_KEY: self.params_hash, "prompt": item["prompt"], "seed": str(item["seed"])}
        try:
            with Image.open(path) as im:
                return all(im.text.get(k) == v for k, v in expected.items())
        except OSError:
            return False

    def prepare(self) -> None:
        """Create the folder and remove temp files of a killed run (call on one rank)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        # atomic_write_bytes names its temp files .<name>.<host>-<pid>-<rand>.tmp
        for stray in self.images_dir.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        # From now on the manifest describes this plan (a kill before finalize() leaves the
        # images of this plan that were already done listed, not an earlier plan's).
        self.write_manifest()

    def write(self, item: dict[str, Any]) -> None:
        """One finished image (``item``: a plan item + ``image`` + ``guidance_weights``)."""
        record = self.record(item)
        save_image_atomic(
            item["image"],
            self.path_for(item["index"]),
            text={
                "prompt": item["prompt"],
                "seed": str(item["seed"]),
                HASH_KEY: self.params_hash,
                PARAMS_KEY: json.dumps(record, sort_keys=True),
            },
        )

    def record(self, item: dict[str, Any]) -> dict[str, Any]:
        return {
            "index": item["index"],
            "file": str(self.path_for(item["index"]).relative_to(self.out_dir)),
            "prompt": item["prompt"],
            "prompt_index": item["prompt_index"],
            "image_index": item["image_index"],
            "seed": item["seed"],
            "guidance_weights": item["guidance_weights"],
            "params_hash": self.params_hash,
            **self.params,
        }

    def write_manifest(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Write ``samples.jsonl``: the records (from the PNGs' own) of the plan's finished
        images, atomically; returns them and the indices still missing."""
        records, missing = [], []
        for index in range(len(self.plan)):
            if not self.is_done(index):
                missing.append(index)
                continue
            with Image.open(self.path_for(index)) as im:
                records.append(json.loads(im.text[PARAMS_KEY]))
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.out_dir / MANIFEST, lines)
        return records, missing

    def finalize(self, loggers: Sequence[Logger] = ()) -> list[dict[str, Any]]:
        """Write ``samples.jsonl`` (from the PNGs' own records) and one grid per prompt.

        With ``loggers``, the grids also go to them, captioned with prompt, seeds and weights.
        """
        records, missing = self.write_manifest()
        total = len(self.plan)
        if missing:
            log.warning("%d of %d images missing: %s", len(missing), total, missing[:10])
        grids, captions = [], []
        if self.grids:
            for p, prompt in enumerate(self.plan.prompts):
                # the finished images of this prompt (a stale PNG of other settings is not shown)
                mine = [r for r in records if r["prompt_index"] == p]
                if mine:
                    images = [Image.open(self.out_dir / r["file"]).convert("RGB") for r in mine]
                    caption = grid_caption(prompt, mine)
                    labels = [f"seed {r['seed']}" for r in mine]
                    grid = make_grid(images, title=caption, labels=labels)
                    save_image_atomic(grid, self.out_dir / "grids" / grid_name(p, prompt))
                    grids.append(grid)
                    captions.append(caption)
        if loggers and grids:
            log_images(loggers, "samples/grid", grids, captions)
        return records


def grid_caption(prompt: str, records: Sequence[dict[str, Any]]) -> str:
    """``prompt | seeds a..b | sampler w_d=.., w_c=.. | used: term=mean weight, ...``."""
    seeds = [r["seed"] for r in records]
    settings = records[0].get("sampler", {}) if records else {}
    given = ", ".join(
        f"{k}={'auto' if settings.get(k) is None else settings.get(k)}" for k in ("w_d", "w_c")
    )
    used: dict[str, list[float]] = {}
    for r in records:
        for name, w in r["guidance_weights"].items():
            used.setdefault(name, []).append(float(w))
    used_text = ", ".join(f"{k}={sum(v) / len(v):.3g}" for k, v in sorted(used.items()))
    seed_text = f"{min(seeds)}..{max(seeds)}" if seeds else "-"
    name = settings.get("name", "")
    return f"{prompt} | seeds {seed_text} | {name} {given} | used: {used_text}"
