"""The sampling plan: global image index -> prompt, seed and file name; prompts x seeds as data.

Image ``g = prompt_index * images_per_prompt + k`` always gets seed ``seed + g`` and the file
``p{prompt_index:04d}_{g:06d}.png``, whatever the number of devices or which images a resumed
run redoes. Whether an image is done is decided by the writer (the PNG on disk).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset


def image_seed(seed: int, index: int) -> int:
    """Seed of the image with global index ``index``: the same whatever devices or order."""
    return int(seed) + int(index)


def params_hash(params: dict[str, Any]) -> str:
    """Short hash of the settings that decide the images (stored in each PNG, checked on rerun)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SamplingPlan:
    """Which images a run makes: ``len(prompts) * images_per_prompt`` of them, seeded from ``seed``."""

    prompts: tuple[str, ...]
    images_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if not self.prompts:
            raise ValueError("no prompts: give at least one prompt")
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))

    def __len__(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def prompt_of(self, index: int) -> str:
        return self.prompts[index // self.images_per_prompt]

    def file_name(self, index: int) -> str:
        return f"p{index // self.images_per_prompt:04d}_{index:06d}.png"

    def item(self, index: int) -> dict[str, Any]:
        p, k = divmod(index, self.images_per_prompt)
        return {
            "index": index,
            "prompt_index": p,
            "image_index": k,
            "prompt": self.prompts[p],
            "seed": image_seed(self.seed, index),
        }


class PromptGrid(Dataset):
    """The plan as a dataset: index -> ``SamplingPlan.item`` (+ ``done`` when ``is_done`` is given)."""

    def __init__(
        self,
        prompts: Sequence[str] | SamplingPlan,
        images_per_prompt: int = 1,
        seed: int = 0,
        is_done: Callable[[int], bool] | None = None,
    ):
        self.plan = (
            prompts
            if isinstance(prompts, SamplingPlan)
            else SamplingPlan(tuple(prompts), images_per_prompt, seed)
        )
        self.is_done = is_done

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.plan.item(index)
        # Checked when fetched, not when built: a rerun skips what any rank finished.
        item["done"] = bool(self.is_done(index)) if self.is_done is not None else False
        return item


def collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batches stay lists of plan items (prompts are strings, seeds per image)."""
    return items


class PromptsDataModule(L.LightningDataModule):
    """Prompts x seeds for ``Trainer.predict``: one batch = ``batch_size`` plan items, in order.

    Lightning shards the indices over devices; each image's seed comes from its global index.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        images_per_prompt: int = 1,
        seed: int = 0,
        batch_size: int = 4,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.plan = SamplingPlan(tuple(prompts), images_per_prompt, seed)
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            PromptGrid(self.plan), batch_size=self.batch_size, shuffle=False, collate_fn=collate
        )
