"""True-size layouts of the base models idgen knows, in one place.

The fields of each model's published ``config.json`` that set its shapes (diffusers /
transformers layout), so that a model can be built at its real size without downloading it:
on the ``meta`` device to count parameters and plan memory in seconds
(:mod:`idgen.memory.plan`), or with random weights for benchmarks at true size
(``benchmarks/bench_common.py``). The block layout every SD1.5-family UNet/VAE shares lives in
:mod:`idgen.models.tiny`.
"""

from __future__ import annotations

from typing import Any

from idgen.models.tiny import SD15_UNET_LAYOUT, SD15_VAE_LAYOUT

#: CLIP's BPE vocabulary (every SD text encoder's token embedding has this many rows)
CLIP_VOCAB_SIZE = 49408

# stable-diffusion-v1-5/unet/config.json: 859,520,964 parameters
SD15_UNET: dict[str, Any] = dict(
    SD15_UNET_LAYOUT,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
)
# stable-diffusion-v1-5/vae/config.json: 83,653,863 parameters
SD15_VAE: dict[str, Any] = dict(
    SD15_VAE_LAYOUT,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
# CLIP ViT-L/14's text tower (stable-diffusion-v1-5/text_encoder/config.json), without the
# vocabulary size (benchmarks use the tiny offline tokenizer's; plans use CLIP_VOCAB_SIZE).
SD15_TEXT: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json: 2,567,463,684 parameters
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# stabilityai/stable-diffusion-xl-base-1.0/vae/config.json (SD's VAE, another latent scale)
SDXL_VAE: dict[str, Any] = dict(SD15_VAE, scaling_factor=0.13025, sample_size=1024)
# SDXL text_encoder (CLIP ViT-L, hidden states only) and text_encoder_2 (OpenCLIP ViT-bigG
# with projection)
SDXL_TEXT: dict[str, Any] = dict(SD15_TEXT)
SDXL_TEXT_2: dict[str, Any] = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)

#: layout name -> a base model's true-size parts: ``family`` (its
#: :data:`idgen.models.family.FAMILIES` name), ``hub_id`` (the checkpoint it describes),
#: ``denoiser`` (UNet or transformer config), ``vae`` (VAE config), ``text_encoders`` (list of
#: (transformers class name, config)), ``resolution`` (native px). Filled in below the SD3 layouts.
TRUE_SIZE: dict[str, dict[str, Any]] = {
    "sd15": {
        "family": "sd15",
        "hub_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "denoiser": SD15_UNET,
        "vae": SD15_VAE,
        "text_encoders": [("CLIPTextModel", SD15_TEXT)],
        "resolution": 512,
    },
    "sdxl": {
        "family": "sdxl",
        "hub_id": "stabilityai/stable-diffusion-xl-base-1.0",
        "denoiser": SDXL_UNET,
        "vae": SDXL_VAE,
        "text_encoders": [
            ("CLIPTextModel", SDXL_TEXT),
            ("CLIPTextModelWithProjection", SDXL_TEXT_2),
        ],
        "resolution": 1024,
    },
}

# --- SD3 / SD3.5 (MMDiT)
# Parameter counts (meta device, this diffusers); Stability's published sizes also count the
# position-embedding buffer (pos_embed_max_size^2 x inner width).
# stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json: 2,028,328,000
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: self-attention in the first 13 blocks,
# RMS-normed q/k): 2,243,171,520 (+ a 226M-value position buffer: the "2.5B")
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    SD3_MEDIUM_TRANSFORMER,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
# stabilityai/stable-diffusion-3.5-large: 8,056,627,520 (the "8B")
SD35_LARGE_TRANSFORMER: dict[str, Any] = dict(
    SD3_MEDIUM_TRANSFORMER,
    num_layers=38,
    num_attention_heads=38,
    caption_projection_dim=2432,
    qk_norm="rms_norm",
)
# SD3's VAE: SD's four levels with 16 latent channels (see models.tiny_sd3.SD3_VAE_LAYOUT)
SD3_VAE: dict[str, Any] = dict(
    SD15_VAE,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=1024,
)
# SD3's text encoders: CLIP ViT-L and OpenCLIP ViT-bigG, both with projection (SDXL's two), and
# T5-XXL's encoder (text_encoder_3/config.json: 4,762,310,656 parameters), which a folder may
# leave out (diffusers then feeds zero T5 tokens; the plan counts the encoders a folder has).
SD3_TEXT: dict[str, Any] = dict(SD15_TEXT)
SD3_TEXT_2: dict[str, Any] = dict(SDXL_TEXT_2)
SD3_T5: dict[str, Any] = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
#: the joint text tokens an SD3 pipeline feeds its transformer: 77 CLIP tokens + T5's
#: ``max_sequence_length`` (256, StableDiffusion3Pipeline's default; zeros without T5)
SD3_CONTEXT_LENGTH = 77 + 256
_SD3_TEXT_ENCODERS = [
    ("CLIPTextModelWithProjection", SD3_TEXT),
    ("CLIPTextModelWithProjection", SD3_TEXT_2),
    ("T5EncoderModel", SD3_T5),
]
for _name, _hub, _denoiser in (
    ("sd3_medium", "stabilityai/stable-diffusion-3-medium-diffusers", SD3_MEDIUM_TRANSFORMER),
    ("sd35_medium", "stabilityai/stable-diffusion-3.5-medium", SD35_MEDIUM_TRANSFORMER),
    ("sd35_large", "stabilityai/stable-diffusion-3.5-large", SD35_LARGE_TRANSFORMER),
):
    TRUE_SIZE[_name] = {
        "family": "sd3",
        "hub_id": _hub,
        "denoiser": _denoiser,
        "vae": SD3_VAE,
        "text_encoders": list(_SD3_TEXT_ENCODERS),
        "resolution": 1024,
    }


def layout_name(family: str, pretrained: str | None = None) -> str:
    """The :data:`TRUE_SIZE` layout of a hub id (``model.pretrained``), else the family's first
    (``sd15``, ``sdxl``, ``sd3_medium``): what a run on a hub id is planned as, nothing
    downloaded. Raises ``KeyError`` for a family without a layout."""
    names = [n for n, layout in TRUE_SIZE.items() if layout["family"] == family]
    if not names:
        raise KeyError(f"no true-size layout for family {family!r}")
    hub = str(pretrained or "").rstrip("/")
    return next((n for n in names if TRUE_SIZE[n]["hub_id"] == hub), names[0])
