"""The toy world on the SDXL and SD3 families: the pretraining recipe per family, the shipped
SDXL base's bar, and the toy job on each family's shipped base (a file of its own, so that
pytest-xdist can run it beside the SD1.5 toy-world files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from idgen.models import load_sd
from idgen.toyworld import BASE_DIR
from idgen.toyworld.job import parse_args, run
from idgen.toyworld.pretrain import Recipe, evaluate_base, pretrain

# the SD1.5 shipped-base check's sample size (tests/test_toyworld.py)
PER_CAPTION = 32
STEPS = 25


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_recipe_makes_a_toy_base_of_each_family(tmp_path, family):
    """``pretrain --family``: a folder of that family's layout that load_sd loads as the family's
    diffusers pipeline and that samples 32px images; SD3's VAE has 16 channels and a calibrated
    latent shift; SDXL may reuse the SD1.5 toy base's VAE (same layout), SD3 may not."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    reuse = family == "sdxl"
    recipe = Recipe(
        family=family,
        seed=1,
        steps=2,
        vae_steps=2,
        batch_size=4,
        warmup_steps=1,
        eval_per_caption=0,
        vae_from=str(BASE_DIR) if reuse else "",
    )
    meta = pretrain(tmp_path / family, recipe, log_every=0)
    pipe = load_sd(tmp_path / family, family=family)
    expected = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[family]
    assert type(pipe) is expected and pipe.vae_scale_factor == 4
    assert meta["family"] == family and (tmp_path / family / "README.md").is_file()
    if reuse:
        shipped = load_file(BASE_DIR / "vae" / "diffusion_pytorch_model.safetensors")
        copied = load_file(tmp_path / family / "vae" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(shipped[k], copied[k]) for k in shipped)
    else:
        assert pipe.vae.config.latent_channels == 16
        assert pipe.vae.config.shift_factor == meta["shift_factor"] != 0.0
        with pytest.raises(ValueError, match="4 latent channels, a sd3 base needs 16"):
            pretrain(tmp_path / "bad", Recipe(family="sd3", vae_from=str(BASE_DIR), steps=1))
        assert not (tmp_path / "bad").exists()
    images = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_recipe_trains_by_the_family_objective_and_unconditional_input(family):
    """What the training loop feeds the denoiser: the family's timesteps (integer DDPM steps;
    SD3: flow-matching 1000 * sigma) and, for dropped captions, the family's unconditional input
    (SDXL: zeros, as force_zeros_for_empty_prompt samples; else the encoding of "")."""
    from idgen.models.family import family_named
    from idgen.toyworld.bases import build_vae, toy_pipeline
    from idgen.toyworld.pretrain import TrainingRecipe, train_noise_prediction

    spec = family_named(family)
    pipe = toy_pipeline(family, 0, build_vae(family))
    seen = []

    def predict(noisy, t, context, pooled, specs):
        seen.append((t, context, pooled))
        return spec.predict(spec.denoiser(pipe), noisy, t, context, pooled, *_ids(spec, noisy))

    recipe = TrainingRecipe(steps=1, batch_size=4, caption_dropout=1.0, warmup_steps=1)
    train_noise_prediction(pipe, spec.denoiser(pipe), predict, recipe, 3, "t", log_every=0)
    ((t, context, pooled),) = seen
    empty, empty_pooled = spec.encode_prompt(pipe, [""], "cpu")
    if family == "sdxl":
        assert not context.any() and not pooled.any()
    else:
        torch.testing.assert_close(context, empty.expand_as(context))
        if pooled is not None:
            torch.testing.assert_close(pooled, empty_pooled.expand_as(pooled))
    if family == "sd3":
        assert t.dtype.is_floating_point and (t > 0).all() and (t <= 1000).all()
        assert (t != t.round()).any()  # sigmas, not DDPM's integer steps
    else:
        assert t.dtype == torch.int64


def _ids(spec, noisy):
    size = torch.tensor([32, 32])
    ids = spec.time_ids(size, torch.zeros(2), size)
    return (None if ids is None else ids.expand(noisy.shape[0], -1),)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl"])
def test_shipped_family_bases_follow_colour_prompts_on_every_background(family):
    """The SDXL toy base meets the SD1.5 base's bar (same prompts, seeds and metrics) through
    its own diffusers pipeline: the start point the toy Table 1 rows need. (The SD3 toy base
    does not: colour 0.836, 0.635 on its dark samples, idgen/toyworld/base_sd3/README.md; it is
    not held to a lower bar here.)"""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from idgen.toyworld.bases import TOY_BASES

    pipe = load_sd(TOY_BASES[family], family=family)
    expected = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[family]
    assert type(pipe) is expected and pipe.vae_scale_factor == 4
    result = evaluate_base(
        pipe, per_caption=PER_CAPTION, num_inference_steps=STEPS, guidance_scale=2.5, seed=0
    )
    assert result["colour_accuracy"] >= 0.9, result
    assert 0.05 <= result["dark_fraction"] <= 0.3, result
    assert result["dark_n"] >= 20 and result["dark_colour_accuracy"] >= 0.9, result


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_job_runs_on_each_familys_toy_base(tmp_path, family):
    """``python -m idgen.toyworld.job --family sdxl|sd3`` (``make table1-sdxl`` / ``table1-sd3``)
    at a tiny budget: every stage runs on the family's shipped toy base through the same CLIs,
    and the table says which base it was. The full-budget rows are the README's (a recipe, not
    a test: minutes of CPU per family)."""
    from idgen.toyworld.bases import TOY_BASES

    out = tmp_path / family
    argv = ["--family", family, "--out", str(out), "--steps", "2", "--inversion-steps", "1"]
    argv += ["--images-per-prompt", "2", "--prompts", "a red circle", "a blue square"]
    results = run(parse_args([*argv, "--sample-steps", "2", "--jobs", "1"]))
    assert set(results["rows"]) == {"base", "finetune", "ours", "ours_auto"}
    assert all(m["num_samples"] == 4 for m in results["rows"].values())
    assert results["settings"]["family"] == family
    title = {"sdxl": "SDXL", "sd3": "SD3"}[family]
    assert f"# Toy world ({title} toy base)" in (out / "results.md").read_text()
    # ours' domain model and the baseline were made from that family's base
    train_cfg = (out / "ours" / "config.yaml").read_text()
    assert str(TOY_BASES[family].name) in train_cfg and f"family: {family}" in train_cfg
    export = out / "finetune" / "baseline_model"
    denoiser = "transformer" if family == "sd3" else "unet"
    assert json.loads((export / "idgen_baseline.json").read_text())["family"] == family
    assert (export / denoiser / "config.json").is_file()
