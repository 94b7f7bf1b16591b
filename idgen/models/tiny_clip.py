"""A tiny random CLIP (model + processor) saved offline: tests and the CPU demos' CLIP metrics."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from idgen.models.tokenizer import build_tiny_clip_tokenizer


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny CLIP to ``folder`` (kept if already there); loads with from_pretrained."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tok = build_tiny_clip_tokenizer()
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        common,
        vocab_size=len(tok),
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(common, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder
