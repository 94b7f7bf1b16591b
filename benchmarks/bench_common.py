"""Shared by the benchmark scripts: random-weight SD1.5-geometry models, timing and memory helpers.

Nothing here downloads anything: ``build_sd("sd15")`` builds Stable Diffusion 1.5's UNet, VAE and
CLIP text encoder from their published configs with random weights (same shapes, same FLOPs), on
the target device directly, so a GPU run does not spend its minutes initialising 1B parameters
on the CPU. ``build_sd("tiny")`` is ``idgen.models.build_tiny_sd``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from idgen.models import build_tiny_sd, build_tiny_sdxl
from idgen.models.layouts import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SDXL_TEXT,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
)
from idgen.models.loading import sd_pipeline
from idgen.models.tiny import SD15_SCHEDULER_CONFIG
from idgen.models.tiny_sdxl import SDXL_SCHEDULER_JSON, sdxl_pipeline
from idgen.models.tokenizer import build_tiny_clip_tokenizer

Geometry = Literal["tiny", "sd15", "tiny_sdxl", "sdxl"]

# SD1.5's true-size shapes live with the other families' in idgen.models.layouts.


def build_sd(
    geometry: Geometry, device: str | torch.device = "cpu", seed: int = 0
) -> StableDiffusionPipeline:
    """A float32 SD pipeline with random weights, built on ``device``.

    ``"tiny"``: ``idgen.models.build_tiny_sd`` (64 px). ``"sd15"``: SD1.5's shapes (512 px,
    860M-parameter UNet), built without any download. ``"tiny_sdxl"``:
    ``idgen.models.build_tiny_sdxl``; ``"sdxl"``: SDXL base's shapes (1024 px, 2.6B-parameter
    UNet, both text encoders), a ``StableDiffusionXLPipeline``.
    """
    if geometry == "tiny":
        return build_tiny_sd(seed=seed, device=device)
    if geometry == "tiny_sdxl":
        return build_tiny_sdxl(seed=seed, device=device)
    if geometry == "sdxl":
        return _build_sdxl(device, seed)
    if geometry != "sd15":
        raise ValueError(f"geometry must be one of {Geometry.__args__}, got {geometry!r}")
    tokenizer = build_tiny_clip_tokenizer()
    text_config = _text_config(tokenizer, SD15_TEXT)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(text_config)
    return sd_pipeline(vae, text_encoder, tokenizer, unet, PNDMScheduler(**SD15_SCHEDULER_CONFIG))


def _text_config(tokenizer, layout: dict) -> CLIPTextConfig:
    """A true-size CLIP text tower over the tiny offline tokenizer's vocabulary."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **layout,
    )


def _build_sdxl(device: str | torch.device, seed: int):
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(_text_config(tokenizer, SDXL_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, SDXL_TEXT_2))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_JSON)
    return sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler)


def native_resolution(sd: StableDiffusionPipeline) -> int:
    """Pixels per side the UNet was configured for (64 tiny, 512 SD1.5)."""
    return sd.unet.config.sample_size * 2 ** (len(sd.vae.config.block_out_channels) - 1)


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: str | torch.device) -> None:
    """Wait for queued device work, so that host clocks measure it."""
    if is_cuda(device):
        torch.cuda.synchronize()


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics; on the CPU the process's resident
    high-water mark (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: peak_memory_mb stays the whole process's high-water mark
        pass


def peak_memory_mb(device: str | torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset. CPU: the process's peak RSS since
    the last reset (VmHWM; where it cannot be reset, ``ru_maxrss`` over the whole process)."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object], device: str | torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start
