"""A tiny Stable Diffusion 3 look-alike with random weights, for tests and CPU demos."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from idgen.models.tiny_sdxl import TINY_TEXT_DIM, _text_config
from idgen.models.tokenizer import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer
from idgen.utils.dtypes import parse_optional_dtype

#: stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json: flow matching, shift 3.
SD3_SCHEDULER_JSON = dict(num_train_timesteps=1000, shift=3.0)
#: What every SD3/SD3.5 VAE shares (…/vae/config.json): SD's four levels, 16 latent channels,
#: a latent shift and scale, no quant convs.
SD3_VAE_LAYOUT = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
#: The tiny MMDiT: 2 joint blocks, 4 heads of 8 (inner 32), patch 2 over 8x8x16 latents; the
#: context is the two CLIPs' hidden states (2 x 32) zero-padded to ``joint_attention_dim``, the
#: pooled projection their two projections (2 x 32), as in SD3 at 4096 / 2048.
TINY_SD3_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=2 * TINY_TEXT_DIM,
    caption_projection_dim=32,
    pooled_projection_dim=2 * TINY_TEXT_DIM,
    pos_embed_max_size=16,
)


def sd3_pipeline(
    transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, **t5: object
) -> StableDiffusion3Pipeline:
    """diffusers' ``StableDiffusion3Pipeline`` over these parts (T5 optional: ``text_encoder_3``
    and ``tokenizer_3``, None by default, as diffusers allows), progress bar off."""
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5.get("text_encoder_3"),
        tokenizer_3=t5.get("tokenizer_3"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3(
    seed: int = 0,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    shift: float = 3.0,
    use_dynamic_shifting: bool = False,
    t5: bool = False,
    family: str = "sd3",
) -> StableDiffusion3Pipeline:
    """Build a ``StableDiffusion3Pipeline`` with tiny random weights in SD3 geometry.

    Two CLIP text encoders with projection (hidden states concatenated and padded to the
    transformer's context width; pooled = both projections), no T5 unless ``t5`` (a tiny
    ``T5EncoderModel`` of the context width and an offline T5 tokenizer; without it
    ``text_encoder_3=None`` and diffusers feeds zero T5 tokens, as for SD3 loaded without T5), a tiny
    ``SD3Transformer2DModel`` (MMDiT), a 16-channel VAE with a factor-8 latent and SD3's
    ``FlowMatchEulerDiscreteScheduler`` (``shift``; ``use_dynamic_shifting`` picks the shift
    from the image size, as SD3.5/FLUX configs may). Deterministic for ``seed``, no download;
    ``save_pretrained`` writes a folder ``StableDiffusion3Pipeline.from_pretrained`` loads.
    ``family`` is the config's ``model.family`` (read by checks without building the model).
    """
    if family != "sd3":
        raise ValueError(f"model.family={family!r}: the tiny SD3 preset is of family 'sd3'.")
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
        vae = AutoencoderKL(
            **SD3_VAE_LAYOUT,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, TINY_TEXT_DIM))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TINY_TEXT_DIM))
        extra = {}
        if t5:
            tokenizer_3 = build_tiny_t5_tokenizer()
            config = T5Config(
                vocab_size=len(tokenizer_3),
                d_model=TINY_SD3_TRANSFORMER["joint_attention_dim"],  # as T5-XXL's 4096 in SD3
                d_kv=16,
                d_ff=64,
                num_layers=1,
                num_heads=2,
                decoder_start_token_id=0,
                dropout_rate=0.0,  # a built model is in train mode; pretrained ones load in eval
            )
            extra = {"text_encoder_3": T5EncoderModel(config).eval(), "tokenizer_3": tokenizer_3}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        dict(SD3_SCHEDULER_JSON, shift=shift, use_dynamic_shifting=use_dynamic_shifting)
    )
    pipe = sd3_pipeline(
        transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, **extra
    )
    torch_dtype = parse_optional_dtype(torch_dtype, "model.torch_dtype")
    if torch_dtype is not None or device is not None:
        pipe.to(device=device, dtype=torch_dtype)
    return pipe
