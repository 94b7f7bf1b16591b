"""CLIP score (torchmetrics) and CLIP zero-shot attribute alignment, working on transformers 5.

torchmetrics 1.9's ``CLIPScore`` expects ``get_image_features``/``get_text_features`` to return
tensors and refuses local paths without "openai" in them; transformers 5 returns a ModelOutput.
So we load the model ourselves and hand torchmetrics a callable returning (wrapped model,
processor), which torchmetrics supports.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore


class CLIPLoadError(FileNotFoundError):
    """A CLIP model could not be loaded from a folder or the hub."""


_HOW_TO_GET = (
    "Download a CLIP model on a machine with internet, e.g. `hf download openai/clip-vit-large-patch14 "
    "--local-dir <folder>`, copy the folder here and pass metrics.clip.model=<folder>."
)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _as_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return projected embeddings as tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _as_tensor(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )


def load_clip(name_or_path: str | os.PathLike, local_files_only: bool | None = None):
    """Load (``CLIPFeatures``, ``CLIPProcessor``) from a local folder or a hub id."""
    from transformers import CLIPModel, CLIPProcessor

    source = os.path.expanduser(str(name_or_path))
    if Path(source).exists() or source.startswith((".", "/", "~")):
        if not (Path(source) / "config.json").is_file():
            raise CLIPLoadError(f"CLIP folder '{source}' has no config.json. " + _HOW_TO_GET)
        local_files_only = True
    elif local_files_only is None:
        local_files_only = _offline()
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        where = "the local cache (offline)" if local_files_only else "the hub"
        raise CLIPLoadError(
            f"Could not load CLIP '{source}' from {where}: {err}. " + _HOW_TO_GET
        ) from err
    return CLIPFeatures(model.eval()), processor


def clip_loader(name_or_path: str | os.PathLike) -> Callable[[], tuple[CLIPFeatures, object]]:
    """The callable torchmetrics' ``CLIPScore(model_name_or_path=...)`` accepts."""
    return lambda: load_clip(name_or_path)


@torch.no_grad()
def clip_score(
    images: Sequence[torch.Tensor] | torch.Tensor,
    prompts: Sequence[str],
    loader: Callable[[], tuple[nn.Module, object]],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> float:
    """torchmetrics CLIP score: mean over images of max(100 * cos(image, prompt), 0)."""
    if len(images) != len(prompts):
        raise ValueError(f"CLIP score: {len(images)} images but {len(prompts)} prompts.")
    metric = CLIPScore(model_name_or_path=loader).to(device)
    for start in range(0, len(prompts), batch_size):
        batch = [im.to(device) for im in images[start : start + batch_size]]
        metric.update(batch, list(prompts[start : start + batch_size]))
    return float(metric.compute())


@dataclass(frozen=True)
class Attribute:
    """An attribute prompt and the two captions CLIP chooses between to check it."""

    prompt: str  # what the samples were generated with
    positive: str  # caption when the attribute is present
    negative: str  # caption when it is absent


@torch.no_grad()
def _embed(model: CLIPFeatures, processor, images=None, texts=None, device="cpu") -> torch.Tensor:
    if images is not None:
        pixels = processor(images=[im.cpu() for im in images], return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixels.to(device))
    else:
        tokens = processor(text=list(texts), return_tensors="pt", padding=True)
        features = model.get_text_features(
            tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        )
    return torch.nn.functional.normalize(features.float(), dim=-1)


def attribute_alignment(
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    attributes: Sequence[Attribute],
    model: CLIPFeatures,
    processor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict:
    """CLIP zero-shot check that each sample shows the attribute of its prompt.

    A sample generated with ``attribute.prompt`` counts as aligned when its CLIP image
    embedding is strictly closer (cosine) to ``attribute.positive`` than to
    ``attribute.negative``. Returns the overall rate and per-attribute rates and counts.
    This stands in for the paper's facial attribute predictors (Table 1, text-guided Align.).
    """
    by_prompt = {a.prompt: a for a in attributes}
    model = model.to(device)
    per_attr: dict[str, list[int]] = {a.prompt: [0, 0] for a in attributes}
    for a in attributes:
        idx = [i for i, p in enumerate(prompts) if p == a.prompt]
        if not idx:
            continue
        text = _embed(model, processor, texts=[a.positive, a.negative], device=device)
        for start in range(0, len(idx), batch_size):
            chunk = [images[i] for i in idx[start : start + batch_size]]
            sims = _embed(model, processor, images=chunk, device=device) @ text.T
            per_attr[a.prompt][0] += int((sims[:, 0] > sims[:, 1]).sum())
            per_attr[a.prompt][1] += len(chunk)
    unknown = sorted(set(prompts) - set(by_prompt))
    counted = sum(n for _, n in per_attr.values())
    if counted == 0:
        raise ValueError(
            "attribute alignment: no sample was generated with any configured attribute prompt "
            f"(sample prompts: {sorted(set(prompts))[:5]}...; attribute prompts: {sorted(by_prompt)[:5]}...)."
        )
    return {
        "attribute_alignment": sum(k for k, _ in per_attr.values()) / counted,
        "attribute_num_samples": counted,
        "attribute_per_prompt": {
            p: {"alignment": k / n, "num_samples": n} for p, (k, n) in per_attr.items() if n
        },
        "attribute_unmatched_prompts": unknown,
    }
