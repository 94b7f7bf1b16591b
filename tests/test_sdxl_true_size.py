"""SDXL in its real layout (base 1.0's UNet config), built on the meta device so no weights are
allocated: the null-text conversion covers all 70 transformer blocks, removes exactly attn2 and
norm2 (counted by hand below), and the converted model runs a 256 px forward (shapes only)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from idgen.models import NullTextUNet
from idgen.models.layouts import SDXL_UNET  # stable-diffusion-xl-base-1.0/unet/config.json


def _removed_per_block(dim: int, context: int = 2048) -> int:
    # attn2: to_q (dim x dim), to_k and to_v (context x dim), to_out (dim x dim + bias);
    # norm2: weight and bias
    return 2 * dim * dim + 2 * context * dim + dim + 2 * dim


def test_true_size_sdxl_null_text_conversion_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    total = sum(p.numel() for p in unet.parameters())
    assert total == 2_567_463_684  # SDXL base 1.0's UNet (10.3 GB in fp32)

    features = torch.empty(1, 77, 2048, device="meta")
    pooled = torch.empty(1, 1280, device="meta")
    null = NullTextUNet.from_unet(unet, features, pooled_features=pooled)
    embeddings = [p for n, p in null.named_parameters() if n.endswith("domain_embedding")]
    # blocks at 640 channels: 2 down x 2 layers + 3 up x 2; at 1280: 2 x 10 + mid 10 + 3 x 10
    widths = sorted(p.numel() for p in embeddings)
    assert widths == [640] * 10 + [1280] * 60
    removed = 10 * _removed_per_block(640) + 60 * _removed_per_block(1280)
    added = 10 * 640 + 60 * 1280 + 1280  # E_l per block + the pooled vector
    assert sum(p.numel() for p in null.parameters()) == total - removed + added

    x = torch.empty(2, 4, 32, 32, device="meta")  # 256 px
    t = torch.tensor([10, 500], device="meta")
    out = null(x, t, time_ids=torch.empty(2, 6, device="meta")).sample
    assert out.shape == (2, 4, 32, 32)
