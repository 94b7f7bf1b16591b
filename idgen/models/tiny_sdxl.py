"""A tiny Stable Diffusion XL look-alike with random weights, for tests and CPU demos."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from idgen.models.tiny import SD15_SCHEDULER_CONFIG, SD15_VAE_LAYOUT
from idgen.models.tokenizer import build_tiny_clip_tokenizer
from idgen.utils.dtypes import parse_optional_dtype

# SDXL base 1.0's scheduler_config.json in the fields that matter: SD's betas, Euler, "leading".
SDXL_SCHEDULER_JSON = {
    **SD15_SCHEDULER_CONFIG,
    "clip_sample": False,
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
#: What every SDXL UNet shares (stable-diffusion-xl-base-1.0/unet/config.json): three levels, no
#: cross-attention in the first, linear projections, pooled text + 6 time ids as added condition.
SDXL_UNET_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
)
#: SDXL's VAE: SD1.5's layout with SDXL's latent scale; it overflows in fp16 (force_upcast).
SDXL_VAE_LAYOUT = dict(SD15_VAE_LAYOUT, scaling_factor=0.13025, force_upcast=True)
#: Tiny sizes: 32-wide encoders (pooled 32, context 64), 8 latent pixels (64 px images).
TINY_TEXT_DIM = 32
TINY_TIME_EMBED_DIM = 8


def _text_config(tokenizer, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
    )


def sdxl_pipeline(
    vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler
) -> StableDiffusionXLPipeline:
    """diffusers' ``StableDiffusionXLPipeline`` over these parts, as ``load_sd`` makes it: no
    invisible watermark, SDXL's zero unconditional embeddings, progress bar off."""
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(
    seed: int = 0,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> StableDiffusionXLPipeline:
    """Build a ``StableDiffusionXLPipeline`` with tiny random weights in SDXL geometry.

    Two CLIP text encoders (the second with projection: the pooled embedding), a UNet with
    ``addition_embed_type="text_time"`` (pooled text + 6 time ids), a 4-level VAE with a
    factor-8 latent and SDXL's Euler scheduler; deterministic for ``seed``, no download.
    ``save_pretrained`` writes a folder that ``StableDiffusionXLPipeline.from_pretrained`` loads.
    """
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **SDXL_UNET_LAYOUT,
            sample_size=8,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 1),
            attention_head_dim=(2, 2, 4),
            norm_num_groups=8,
            cross_attention_dim=2 * TINY_TEXT_DIM,
            addition_time_embed_dim=TINY_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_TEXT_DIM,
        )
        vae = AutoencoderKL(
            **SDXL_VAE_LAYOUT,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(_text_config(tokenizer, TINY_TEXT_DIM))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TINY_TEXT_DIM))
    pipe = sdxl_pipeline(
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_JSON),
    )
    torch_dtype = parse_optional_dtype(torch_dtype, "model.torch_dtype")
    if torch_dtype is not None or device is not None:
        pipe.to(device=device, dtype=torch_dtype)
    return pipe
