"""idgen-sample with an exported Table-1 baseline: standard CFG and unconditional rectification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from idgen.baselines import LoRA, TextualInversion, export_baseline, load_baseline_pipeline
from idgen.baselines.sampling import sample_baseline
from idgen.models import build_tiny_sd
from idgen.sample import sample
from tests.conftest import compose_config

STEPS = 3
PROMPTS = ["a photo of <v> shapes", "a red <v> circle"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A LoRA and a 2-vector textual inversion export with random (non-zero) trained parts."""
    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    sd = build_tiny_sd(seed=0)
    lora = LoRA(rank=2, alpha=4.0)
    lora.prepare(sd.unet)
    with torch.no_grad():
        for name, p in sd.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    out = {"finetune_lora": export_baseline(root / "lora", lora, sd.unet)}
    ti = TextualInversion(num_vectors=2)
    hidden = sd.text_encoder.config.hidden_size
    vectors = torch.randn(2, hidden)
    plain = build_tiny_sd(seed=0)
    out["textual_inversion"] = export_baseline(root / "ti", ti, plain.unet, vectors)
    return out


def _plain_diffusers(folder: Path, method: str):
    """What a diffusers user writes: SD + the adapter, DPM-Solver++ (the sampler's scheduler)."""
    pipe = build_tiny_sd(seed=0)
    if method == "finetune_lora":
        pipe.load_lora_weights(folder)
    else:
        pipe.load_textual_inversion(folder, weight_name="learned_embeds.safetensors", token="<v>")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(tmp_path: Path, sampler: str, folder: Path | None, extra=()) -> list[dict]:
    overrides = [
        f"sampler={sampler}",
        "prompts=[" + ",".join(f"'{p}'" for p in PROMPTS) + "]",  # quoted: < > need it
        "images_per_prompt=1",
        "batch_size=2",
        f"sampler.num_inference_steps={STEPS}",
        *([f"baseline_model={folder}"] if folder else []),
        *extra,
    ]
    cfg = compose_config("sample", tmp_path, overrides)
    assert sample(cfg)["num_images"] == len(PROMPTS)
    run = Path(cfg.paths.output_dir)
    records = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    for r in records:
        r["pixels"] = np.asarray(Image.open(run / r["file"]).convert("RGB")).astype(int)
    return records


@pytest.mark.parametrize("method", ["finetune_lora", "textual_inversion"])
def test_cfg_with_baseline_equals_diffusers_with_the_adapter(tmp_path, exports, method):
    folder = exports[method]
    records = _run(tmp_path, "cfg", folder)
    pipe = _plain_diffusers(folder, method)
    for r in records:
        ref = pipe(
            r["prompt"],
            guidance_scale=r["sampler"]["w_c"],
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(r["seed"]),
        ).images[0]
        # PNG pixels: at most one level of rounding apart (batch of 2 here, 1 in diffusers)
        assert np.abs(r["pixels"] - np.asarray(ref).astype(int)).max() <= 1
        assert r["model_ids"]["baseline"] == str(folder)
        assert r["guidance_weights"] == {"control": 7.5}
    if method == "finetune_lora":  # the adapter is really applied: plain SD differs
        plain = _run(tmp_path / "plain", "cfg", None)
        assert all(
            np.abs(a["pixels"] - b["pixels"]).max() > 8 for a, b in zip(records, plain, strict=True)
        )


@pytest.mark.slow  # four sampling runs: ~20 s on 2 busy cores
def test_rectify_with_baseline_matches_rectified_reference(tmp_path, exports):
    folder = exports["textual_inversion"]
    records = _run(tmp_path, "rectify", folder, ["sampler.extra_guidance.0.weight=3.0"])
    sd = build_tiny_sd(seed=0)
    baseline = load_baseline_pipeline(folder, sd)
    ref = sample_baseline(
        baseline,
        [r["prompt"] for r in records],
        [r["seed"] for r in records],
        guidance_scale=3.0,
        num_inference_steps=STEPS,
        rectify_with=sd,
    )
    for r, image in zip(records, ref, strict=True):
        assert np.abs(r["pixels"] - np.asarray(image).astype(int)).max() <= 1
        assert r["guidance_weights"] == {"baseline": 3.0}
        assert r["model_ids"]["baseline_mode"] == "rectify"
    # A LoRA changes the UNet, so rectifying (frozen SD's unconditional) differs from its own
    # CFG; textual inversion leaves the unconditional alone, where the two coincide.
    lora = exports["finetune_lora"]
    extra = ["sampler.extra_guidance.0.weight=3.0"]
    rect = _run(tmp_path / "lora_rect", "rectify", lora, extra)
    own = _run(tmp_path / "lora_cfg", "cfg", lora, ["sampler.w_c=3.0"])
    assert all(np.abs(a["pixels"] - b["pixels"]).max() > 8 for a, b in zip(rect, own, strict=True))


def test_baseline_errors_are_clear(tmp_path, exports):
    with pytest.raises(FileNotFoundError, match="baseline_model="):
        _run(tmp_path, "cfg", tmp_path / "missing")
    with pytest.raises(ValueError, match="give one of"):
        _run(
            tmp_path / "both",
            "rectify",
            exports["finetune_lora"],
            [f"sampler.extra_guidance.0.model={exports['finetune_lora']}"],
        )
    with pytest.raises(ValueError, match="baseline_mode"):
        _run(tmp_path / "mode", "cfg", exports["finetune_lora"], ["sampler.baseline_mode=merge"])
