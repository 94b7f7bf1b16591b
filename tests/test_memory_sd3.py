"""The memory plan of SD3 / SD3.5 (MMDiT): true-size counts on ``meta`` against the published
sizes and hand counts, the plan's monotonicity, and the tiny SD3's plan against a real step's
measured memory (torch's profiler, not the plan's own saved-tensor count)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import SD3Transformer2DModel

from idgen.memory.plan import RunShape, estimate
from idgen.memory.settings import MemorySettings
from idgen.memory.sizes import activation_bytes, sizes_from_layout, sizes_from_pipeline
from idgen.models.layouts import (
    SD3_CONTEXT_LENGTH,
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
)
from tests.conftest import job_config


@pytest.mark.parametrize(
    ("name", "layout", "published"),
    [
        ("sd35_medium", SD35_MEDIUM_TRANSFORMER, 2.5e9),
        ("sd35_large", SD35_LARGE_TRANSFORMER, 8.1e9),
    ],
)
def test_sd35_sizes_match_diffusers_and_the_published_sizes(name, layout, published):
    """The plan's transformer is diffusers' SD3Transformer2DModel of the layout; its parameters
    plus the position-embedding table are Stability's "2.5B" / "8.1B" (rounded: within 2 %).
    Text encoders: CLIP-L and CLIP-G with projection, T5-XXL's encoder (4.76B)."""
    sizes = sizes_from_layout(name)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**layout)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    assert sizes.denoiser_params == params and sizes.denoiser_buffers == buffers
    assert abs(params + buffers - published) < 0.02 * published
    # 768 x (77 + 49408) + 12 layers x 7,087,872 + LN; SDXL's 694,659,840; t5-v1_1-xxl encoder
    clip_l, clip_g, t5 = 123_060_480 + 768 * 768, 694_659_840, 4_762_310_656
    assert sizes.text_encoder_params == clip_l + clip_g + t5
    assert sizes.largest_text_encoder == t5
    assert sizes.latent_channels == 16 and sizes.vae_factor == 8


def test_null_text_transformer_trains_the_transformer_plus_its_context():
    """NullTextSD3Transformer built on meta: every transformer weight trains (nothing removed:
    the text stream stays), plus the context sequence [333, 4096] and the pooled vector [2048]."""
    from idgen.models.null_text_transformer import NullTextSD3Transformer

    sizes = sizes_from_layout("sd35_medium")
    with torch.device("meta"):
        domain = NullTextSD3Transformer(
            transformer_config=dict(SD35_MEDIUM_TRANSFORMER), context_length=SD3_CONTEXT_LENGTH
        )
    trained = sum(p.numel() for p in domain.parameters() if p.requires_grad)
    assert trained == 2_243_171_520 + 333 * 4096 + 2048
    assert sizes.domain_params == trained


def test_sd3_plan_grows_with_resolution_and_batch_and_memory_low_plans_less():
    sizes = sizes_from_layout("sd35_medium")
    default = MemorySettings()
    low = MemorySettings.from_config(
        dict(frozen_dtype="bfloat16", gradient_checkpointing=True, ema="off", optimizer="adafactor")
        | dict(fused_backward=True)
    )
    small = RunShape(stage="finetune", resolution=256, precision="bf16-mixed", accelerator="cuda")
    peak = {
        "256": estimate(sizes, default, small).peak,
        "512": estimate(sizes, default, RunShape(**{**vars(small), "resolution": 512})).peak,
        "256x2": estimate(sizes, default, RunShape(**{**vars(small), "batch": 2})).peak,
        "low": estimate(sizes, low, small).peak,
    }
    assert peak["512"] > peak["256"] and peak["256x2"] > peak["256"]
    assert peak["low"] < peak["256"]
    # the trained part: fp32 weights + gradients + AdamW's two moments, 16 bytes per parameter
    fixed = estimate(sizes, default, small).parts
    assert fixed["optimizer state"] == 8 * sizes.domain_params
    acts = activation_bytes(sizes, 1, 256, stage="finetune", autocast_dtype=torch.bfloat16)
    assert acts < activation_bytes(sizes, 1, 512, stage="finetune", autocast_dtype=torch.bfloat16)


def _profiled_peak(fn) -> int:
    """Peak bytes the CPU allocator held above the start while ``fn`` ran (torch's profiler:
    each op's own allocations minus frees, in the order the ops ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    now = peak = 0
    for event in events:
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_sd3_plan_matches_a_real_stage2_step(checkpointing):
    """The plan of the tiny SD3's stage-2 step (activations + gradients) against the memory a
    real NullTextSD3Transformer forward + backward holds at its peak, measured by torch's
    profiler, within the 15 % the true-size SD1.5 run is held to (tests/test_memory_true_size)."""
    from idgen.models.family import family_of
    from idgen.models.tiny_sd3 import build_tiny_sd3

    pipe = build_tiny_sd3()
    family = family_of(pipe)
    features, pooled = family.encode_prompt(pipe, ["a photo of shapes"])
    model = family.null_text_model(pipe.transformer, features, pooled).float().train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    batch, resolution = 16, 128
    x = torch.randn(batch, 16, resolution // 8, resolution // 8)
    t = torch.full((batch,), 500.0)
    measured = _profiled_peak(lambda: model(x, t).sample.square().mean().backward())
    sizes = sizes_from_pipeline(pipe)
    grads = sum(p.numel() * 4 for p in model.parameters())
    planned = activation_bytes(
        sizes, batch, resolution, stage="finetune", checkpointing=checkpointing
    )
    assert math.isclose(planned + grads, measured, rel_tol=0.15), (planned + grads, measured)


def test_plan_sd35_prints_the_table_per_gpu_size(tmp_path, capsys):
    from idgen.train import train

    overrides = ["trainer=gpu", "stage=finetune", "data.resolution=1024", "data.batch_size=1"]
    train(job_config("train", tmp_path, ["plan=sd35_large", *overrides]))
    out = capsys.readouterr().out
    assert "memory plan: stage finetune, batch 1, 1024px" in out
    lines = {x.strip()[:5]: x for x in out.splitlines() if "GB GPU:" in x}
    assert set(lines) == {"24 GB", "40 GB", "80 GB"}
    # 8.06B trained parameters in float32 alone are 32 GB: no option fits 24 GB
    assert "does not fit" in lines["24 GB"]


def test_sd3_runs_are_planned_hub_id_as_its_layout_tiny_as_built(tmp_path, capsys):
    """model=sd3 (a hub id, nothing downloaded) is planned as the layout of that checkpoint;
    model=tiny_sd3 is planned from the built tiny pipeline (no "not available" line)."""
    from idgen.memory.check import model_sizes
    from idgen.train import train

    cfg = job_config("train", tmp_path, ["model=sd3"])
    assert model_sizes(cfg).denoiser_params == sizes_from_layout("sd35_medium").denoiser_params
    train(job_config("train", tmp_path, ["model=tiny_sd3", "plan=true"]))
    out = capsys.readouterr().out
    assert "memory plan: stage inversion" in out and "memory plan: stage finetune" in out
    assert "not available" not in out
