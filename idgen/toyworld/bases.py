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
)

from idgen.models.family import family_named
from idgen.models.tiny import TINY_UNET
from idgen.models.tiny_sdxl import (
    SDXL_UNET_LAYOUT,
    TINY_TEXT_DIM,
    TINY_TIME_EMBED_DIM,
)

RESOLUTION = 32
_HERE = Path(__file__).parent
#: the shipped toy base of each family (a diffusers folder ``idgen.models.load_sd`` loads)
TOY_BASES: dict[str, Path] = {
    "sd15": _HERE / "base",
    "sdxl": _HERE / "base_sdxl",
    "sd3": _HERE / "base_sd3",
}

#: SD1.5's toy UNet: the tiny preset's geometry on 8x8 latents (its text width, 32)
TOY_SD15_UNET = dict(TINY_UNET, sample_size=RESOLUTION // 4, cross_attention_dim=32)
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

#: each family's toy denoiser geometry (the class is the family's tiny preset's)
TOY_DENOISERS: dict[str, dict[str, Any]] = {
    "sd15": TOY_SD15_UNET,
    "sdxl": TOY_SDXL_UNET,
    "sd3": TOY_SD3_TRANSFORMER,
}


def _tiny_vae_config(family: str) -> Any:
    """The family's tiny preset's VAE config: its latent channels, quant convs and shift."""
    return family_named(family).build_tiny(seed=0).vae.config


def vae_latent_channels(family: str) -> int:
    """Latent channels of ``family``'s VAE (4; SD3: 16), as its tiny preset has them."""
    return _tiny_vae_config(family).latent_channels


def build_vae(family: str = "sd15") -> AutoencoderKL:
    """The toy VAE of ``family``: 3 levels (factor 4) with the family's latent channels, quant
    convs and (SD3) latent shift, read from its tiny preset; the shift is calibrated after
    training."""
    ref = _tiny_vae_config(family)
    shift = getattr(ref, "shift_factor", None)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=ref.latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        use_quant_conv=ref.use_quant_conv,
        use_post_quant_conv=ref.use_post_quant_conv,
        shift_factor=None if shift is None else 0.0,
    )


def toy_pipeline(family: str, seed: int, vae: AutoencoderKL) -> Any:
    """A fresh toy base of ``family`` (its diffusers txt2img pipeline) around ``vae``: the
    tiny preset's frozen text encoders, tokenizers and scheduler (the family's real scheduler
    config), and a fresh denoiser of the preset's class in ``TOY_DENOISERS[family]``'s
    geometry. Deterministic for ``seed``."""
    if family not in TOY_DENOISERS:
        raise ValueError(f"no toy base recipe for model family {family!r}; use {sorted(TOY_BASES)}")
    spec = family_named(family)
    tiny = spec.build_tiny(seed=seed)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(tiny, name, None)
        if encoder is not None:
            encoder.requires_grad_(False).eval()
    denoiser = type(spec.denoiser(tiny))(**TOY_DENOISERS[family])
    # the family's own loading options (no safety checker, no watermark), as load_sd applies
    parts = {"vae": vae, spec.denoiser_name: denoiser, **dict(spec.load_kwargs)}
    pipe = spec.txt2img.from_pipe(tiny, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
