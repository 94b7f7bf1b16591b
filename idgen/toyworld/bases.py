"""The toy base of each model family: fresh parts in the family's layout, sized for 32px images.

One toy base per family is shipped (``TOY_BASES``): SD1.5 (``base/``), SDXL (``base_sdxl/``)
and SD3 (``base_sd3/``), each pretrained by the same recipe (``idgen.toyworld.pretrain
--family ...``) on the same open world, so that the toy Table 1 can ask whether the paper's
claim holds on each family. What differs is only what the family is:

- SD1.5: one CLIP text encoder, a four-level UNet with cross-attention, DDPM/PNDM (epsilon);
- SDXL: two CLIP encoders (pooled text of the second), a three-level UNet with SDXL's
  ``text_time`` added conditions, SDXL's Euler scheduler (epsilon);
- SD3: two CLIP encoders with projection (and no T5, as ``text_encoder_3=None``), an MMDiT
  ``SD3Transformer2DModel``, a 16-channel VAE with a latent shift, flow matching (shift 3).

The text encoders and tokenizers are the family's tiny preset's (``build_tiny_*``: random,
frozen, whole-word tokens for the colours and shapes). Every VAE has factor 4 at 32px, so
the latent stays 8x8 (see ``pretrain``'s docstring for why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from idgen.models.family import family_named
from idgen.models.loading import sd_pipeline
from idgen.models.tiny import SD15_SCHEDULER_JSON, TINY_UNET
from idgen.models.tiny_sd3 import SD3_SCHEDULER_JSON, SD3_VAE_LAYOUT, sd3_pipeline
from idgen.models.tiny_sdxl import (
    SDXL_SCHEDULER_JSON,
    SDXL_UNET_LAYOUT,
    TINY_TEXT_DIM,
    TINY_TIME_EMBED_DIM,
    sdxl_pipeline,
)

RESOLUTION = 32
_HERE = Path(__file__).parent
#: the shipped toy base of each family (a diffusers folder ``idgen.models.load_sd`` loads)
TOY_BASES: dict[str, Path] = {
    "sd15": _HERE / "base",
    "sdxl": _HERE / "base_sdxl",
    "sd3": _HERE / "base_sd3",
}

#: SDXL's toy UNet: SDXL's three levels (no attention in the first, more transformer layers
#: deeper) on 8x8 latents, 3.5M parameters (SD1.5's toy UNet: 1.6M)
TOY_SDXL_UNET = dict(
    SDXL_UNET_LAYOUT,
    sample_size=RESOLUTION // 4,
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(4, 8, 8),
    norm_num_groups=8,
    cross_attention_dim=2 * TINY_TEXT_DIM,
    addition_time_embed_dim=TINY_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_TEXT_DIM,
)
#: SD3's toy MMDiT: 4 joint blocks of 4 heads x 16 over patch-2 tokens of 8x8x16 latents. Its
#: context is SD3's without T5: 77 CLIP tokens + 256 zero T5 tokens (what diffusers feeds).
TOY_SD3_TRANSFORMER = dict(
    sample_size=RESOLUTION // 4,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=2 * TINY_TEXT_DIM,
    caption_projection_dim=64,
    pooled_projection_dim=2 * TINY_TEXT_DIM,
    pos_embed_max_size=16,
)


def build_vae(latent_channels: int = 4) -> AutoencoderKL:
    """The toy VAE: 3 levels (factor 4), ``latent_channels`` (SD3: 16, no quant convs)."""
    sd3 = latent_channels == SD3_VAE_LAYOUT["latent_channels"]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
        shift_factor=0.0 if sd3 else None,  # SD3's latent shift, calibrated after training
    )


def vae_latent_channels(family: str) -> int:
    return SD3_VAE_LAYOUT["latent_channels"] if family == "sd3" else 4


def toy_pipeline(family: str, seed: int, vae: AutoencoderKL) -> Any:
    """A fresh toy base of ``family`` (its diffusers txt2img pipeline) around ``vae``: the
    tiny preset's frozen text encoders and tokenizers, a fresh denoiser, the family's
    scheduler. Deterministic for ``seed``."""
    spec = family_named(family)
    tiny = spec.build_tiny(seed=seed)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(tiny, name, None)
        if encoder is not None:
            encoder.requires_grad_(False).eval()
    if family == "sd15":
        unet = UNet2DConditionModel(
            **{**TINY_UNET, "sample_size": RESOLUTION // 4},
            cross_attention_dim=tiny.text_encoder.config.hidden_size,
        )
        scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_JSON)  # clip_sample included
        return sd_pipeline(vae, tiny.text_encoder, tiny.tokenizer, unet, scheduler)
    if family == "sdxl":
        unet = UNet2DConditionModel(**TOY_SDXL_UNET)
        return sdxl_pipeline(
            vae,
            tiny.text_encoder,
            tiny.text_encoder_2,
            tiny.tokenizer,
            tiny.tokenizer_2,
            unet,
            EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_JSON),
        )
    if family == "sd3":
        return sd3_pipeline(
            SD3Transformer2DModel(**TOY_SD3_TRANSFORMER),
            FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_JSON),
            vae,
            tiny.text_encoder,
            tiny.tokenizer,
            tiny.text_encoder_2,
            tiny.tokenizer_2,
        )
    raise ValueError(f"no toy base recipe for model family {family!r}; use {sorted(TOY_BASES)}")
