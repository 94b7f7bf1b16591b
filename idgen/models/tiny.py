"""A tiny Stable Diffusion 1.5 look-alike with random weights, for tests and the CPU demo."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from idgen.models.loading import sd_pipeline
from idgen.models.tokenizer import build_tiny_clip_tokenizer
from idgen.utils.dtypes import parse_optional_dtype

# SD1.5's scheduler_config.json, verbatim in the fields that matter for training and sampling.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)
# SD1.5's scheduler_config.json: the above plus clip_sample=False, which PNDMScheduler(**...)
# rejects but DDIM/DDPM built from the saved config read. Build with
# PNDMScheduler.from_config(SD15_SCHEDULER_JSON) so the saved config carries it.
SD15_SCHEDULER_JSON = {**SD15_SCHEDULER_CONFIG, "clip_sample": False}


#: What every SD1.5-family UNet shares (stable-diffusion-v1-5/unet/config.json): four levels,
#: cross-attention in the first three down and last three up blocks, 4 latent channels.
SD15_UNET_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
)
#: The tiny UNet: SD1.5's layout at 32/64 channels, one layer per block, 8 latent pixels.
TINY_UNET = dict(
    SD15_UNET_LAYOUT,
    sample_size=8,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
)
#: What every SD1.5-family VAE shares (stable-diffusion-v1-5/vae/config.json): four levels, a
#: factor-8 latent with 4 channels, SD's latent scaling.
SD15_VAE_LAYOUT = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    scaling_factor=0.18215,
)


def build_tiny_sd(
    seed: int = 0,
    cross_attention_dim: int = 32,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> StableDiffusionPipeline:
    """Build a ``StableDiffusionPipeline`` with tiny random weights in SD1.5 geometry.

    Same component types and layout as SD1.5 (4-level VAE with a factor-8 latent, four
    UNet levels with cross-attention in the first three, CLIP text encoder and tokenizer,
    SD1.5 scheduler settings), deterministic for ``seed`` and built without any download.
    """
    tokenizer = build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=cross_attention_dim)
        vae = AutoencoderKL(
            **SD15_VAE_LAYOUT,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=cross_attention_dim,
            )
        )
    pipe = sd_pipeline(
        vae, text_encoder, tokenizer, unet, PNDMScheduler.from_config(SD15_SCHEDULER_JSON)
    )
    torch_dtype = parse_optional_dtype(torch_dtype, "model.torch_dtype")
    if torch_dtype is not None or device is not None:
        pipe.to(device=device, dtype=torch_dtype)
    return pipe
