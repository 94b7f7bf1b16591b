"""The toy world's comparison figure: one row per method, one column per prompt."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from idgen.data.images import load_rgb
from idgen.utils.io import save_image_atomic

LABELS = {
    "base": "base (CFG)",
    "finetune": "fine-tuned",
    "ours": "ours",
    "ours_auto": "ours, auto w",
}


def sample_path(images_dir: Path, prompt_index: int, image_index: int, per_prompt: int) -> Path:
    """Where idgen-sample wrote image ``image_index`` of prompt ``prompt_index``."""
    index = prompt_index * per_prompt + image_index
    return Path(images_dir) / f"p{prompt_index:04d}_{index:06d}.png"


def comparison_figure(
    rows: Mapping[str, str | os.PathLike],
    prompts: Sequence[str],
    per_prompt: int,
    out: str | os.PathLike,
    images_per_cell: int = 2,
    scale: int = 3,
) -> Path:
    """Rows: ``rows`` (name -> idgen-sample image folder); columns: ``prompts``.

    Each cell stacks the first ``images_per_cell`` images of that prompt (same seeds in every
    row), upscaled ``scale`` x with nearest neighbour so the 32px pixels stay visible.
    """
    k = min(images_per_cell, per_prompt)
    first = load_rgb(sample_path(next(iter(rows.values())), 0, 0, per_prompt))
    side = first.width * scale
    pad, label_w, header_h = 4, 80, 28  # two-line prompt headers
    cell_h = k * side + (k - 1) * pad
    width = label_w + len(prompts) * (side + pad) + pad
    height = header_h + len(rows) * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, prompt in enumerate(prompts):
        # 1. column header: the prompt without its article
        x = label_w + pad + c * (side + pad)
        draw.text((x, 3), prompt.removeprefix("a ").replace(" ", "\n", 1)[:24], fill="black")
    for r, (name, images_dir) in enumerate(rows.items()):
        # 2. one row per method: its label, then k images of every prompt
        y = header_h + pad + r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), LABELS.get(name, name), fill="black")
        for c in range(len(prompts)):
            x = label_w + pad + c * (side + pad)
            for i in range(k):
                image = load_rgb(sample_path(Path(images_dir), c, i, per_prompt))
                image = image.resize((side, side), Image.Resampling.NEAREST)
                canvas.paste(image, (x, y + i * (side + pad)))
    return save_image_atomic(canvas, Path(out))
