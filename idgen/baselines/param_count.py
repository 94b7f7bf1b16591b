"""Trainable-parameter counts of the baselines on the SD1.5 UNet, without any download.

The UNet is built from SD1.5's ``unet/config.json`` on the meta device (no memory, no
weights), each method is applied, and its trainable parameters are counted:

    python -m idgen.baselines.param_count
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from idgen.baselines.methods import (
    OFT,
    BaselineMethod,
    CustomDiffusion,
    FullFinetune,
    LoRA,
    TextualInversion,
)
from idgen.models.layouts import SD15_UNET

# stable-diffusion-v1-5/unet/config.json (fields that shape the parameters)
SD15_UNET_CONFIG = SD15_UNET
SD15_TEXT_HIDDEN = 768  # CLIP ViT-L/14 token embedding width


def sd15_unet_meta() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def trainable_count(
    method: BaselineMethod, unet: UNet2DConditionModel, text_hidden: int = SD15_TEXT_HIDDEN
) -> int:
    """Parameters ``method`` trains on ``unet`` (modified in place) plus its token vectors."""
    unet.requires_grad_(False)
    method.prepare(unet)
    count = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return count + method.num_vectors * text_hidden


def default_methods() -> dict[str, BaselineMethod]:
    return {
        "textual_inversion": TextualInversion(),
        "custom_diffusion": CustomDiffusion(),
        "custom_diffusion (attention=all)": CustomDiffusion(attention="all"),
        "oft": OFT(),
        "finetune": FullFinetune(),
        "finetune_lora": LoRA(),
    }


def sd15_counts() -> dict[str, int]:
    """#param of every default baseline on the SD1.5 UNet (meta device)."""
    return {name: trainable_count(m, sd15_unet_meta()) for name, m in default_methods().items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    for name, n in sd15_counts().items():
        print(f"{name:34s} {n:>12,d}  ({n / 1e6:.3f}M)")


if __name__ == "__main__":
    main()
