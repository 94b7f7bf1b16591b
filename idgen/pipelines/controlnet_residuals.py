"""ControlNet residuals for a batch made of several chunks, each with its own ControlNets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel


@dataclass
class Control:
    """One ControlNet applied to one chunk of a batched UNet input."""

    controlnet: Any
    image: torch.Tensor  # [B, 3, H, W] in [0, 1], already batched like the chunk
    scale: float = 1.0


@dataclass
class Chunk:
    """``B`` rows of a batched UNet forward: one prediction source (text condition + controls)."""

    name: str
    embeds: torch.Tensor | None
    controls: list[Control] = field(default_factory=list)


def split_multi(controlnet: Any, images: list[torch.Tensor], scales: list[float]) -> list[Control]:
    """One :class:`Control` per net of a ControlNet or ``MultiControlNetModel``."""
    nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
    if not (len(nets) == len(images) == len(scales)):
        raise ValueError(
            f"{len(nets)} ControlNet(s) but {len(images)} control image(s) and {len(scales)} "
            "conditioning scale(s); pass one control_image (and scale) per ControlNet."
        )
    return [Control(n, img, s) for n, img, s in zip(nets, images, scales, strict=True)]


def chunk_residuals(
    sample: torch.Tensor, timestep: torch.Tensor, chunks: list[Chunk]
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Down/mid residuals for ``sample`` = the chunks' latents concatenated (``[n*B, ...]``).

    Each ControlNet runs once over all the chunks it applies to (as diffusers batches CFG);
    chunks it does not apply to get zero residuals, so their prediction stays the plain UNet's.
    Several ControlNets on a chunk add up, as in ``MultiControlNetModel``.
    """
    rows = sample.shape[0] // len(chunks)
    groups: dict[tuple[int, float], list[tuple[int, Control]]] = {}
    for k, chunk in enumerate(chunks):
        for control in chunk.controls:
            groups.setdefault((id(control.controlnet), control.scale), []).append((k, control))
    if not groups:
        return None, None

    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for members in groups.values():
        controlnet = members[0][1].controlnet
        idx = torch.cat(
            [torch.arange(k * rows, (k + 1) * rows, device=sample.device) for k, _ in members]
        )
        covers_all = len(members) == len(chunks)
        embeds = torch.cat([chunks[k].embeds for k, _ in members])
        image = torch.cat([c.image for _, c in members]).to(controlnet.dtype)
        d, m = controlnet(
            sample if covers_all else sample[idx],
            timestep,
            encoder_hidden_states=embeds,
            controlnet_cond=image,
            conditioning_scale=members[0][1].scale,
            return_dict=False,
        )
        if not covers_all:
            # Scatter into zeros: x + 0 leaves the other chunks' UNet features untouched.
            d = [
                torch.zeros(
                    (sample.shape[0], *r.shape[1:]), dtype=r.dtype, device=r.device
                ).index_copy(0, idx, r)
                for r in d
            ]
            m = torch.zeros(
                (sample.shape[0], *m.shape[1:]), dtype=m.dtype, device=m.device
            ).index_copy(0, idx, m)
        down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
        mid = m if mid is None else mid + m
    return down, mid
