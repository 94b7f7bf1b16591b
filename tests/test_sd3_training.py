"""SD3 stages 1 and 2 by flow matching: the loss is the straight-path velocity loss with SD3's
logit-normal sigmas (shift applied); stage 1 inverts SD3's joint tokens and pooled vector through
the transformer; stage 2 trains the null-text transformer; model=tiny_sd3 runs through
idgen-train and idgen-sample, and an SD3 domain model with another family's base is one line."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from PIL import Image

from idgen.data import DomainImageDataModule
from idgen.models import FAMILIES, NullTextSD3Transformer, build_tiny_sd3
from idgen.models.domain_models import load_domain_model
from idgen.modules import NullTextFinetuneModule, TextFeatureInversionModule
from idgen.modules.diffusion_loss import sample_noise
from idgen.modules.flow_matching import flow_matching_loss, flow_sigmas
from idgen.modules.sd_parts import load_pooled_features, load_text_features
from idgen.sample import sample
from idgen.train import train
from idgen.utils.validation import UserInputError
from tests.conftest import compose_config, job_config, quiet_trainer

SD3 = FAMILIES["sd3"]


# --- the loss -------------------------------------------------------------------------------


def test_flow_matching_loss_is_the_velocity_loss_on_the_straight_path():
    """z_s = (1 - s) z_0 + s eps at timestep 1000 s, target eps - z_0; noise and sigmas are
    the generator's next draws (noise first, then SD3's logit-normal u)."""
    sigmas = flow_sigmas(dict(num_train_timesteps=1000, shift=3.0))
    latents = torch.randn(6, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = {}

    def predict(noisy, t):
        seen.update(noisy=noisy, t=t)
        return torch.full_like(noisy, 0.25)

    loss = flow_matching_loss(predict, latents, sigmas, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = sample_noise(latents, g)
    u = compute_density_for_timestep_sampling("logit_normal", 6, 0.0, 1.0, generator=g)
    s = sigmas[(u * 1000).long()]
    assert torch.allclose(seen["t"], 1000 * s)
    s4 = s.view(-1, 1, 1, 1)
    assert torch.allclose(seen["noisy"], (1 - s4) * latents + s4 * noise, atol=1e-6)
    assert torch.allclose(loss, ((0.25 - (noise - latents)) ** 2).mean(), atol=1e-6)


def test_sd3_sigmas_are_logit_normal_through_the_shift():
    """Median sigma of logit-normal(0, 1) u is shift(0.5) = 3 * 0.5 / (1 + 2 * 0.5) = 0.75 with
    SD3's shift 3, and 0.5 without shift; 'uniform' spreads sigmas evenly instead."""
    seen = []

    def predict(noisy, t):
        seen.append(t / 1000)
        return torch.zeros_like(noisy)

    latents = torch.zeros(20000, 1, 1, 1)
    for shift, median in ((3.0, 0.75), (1.0, 0.5)):
        sigmas = flow_sigmas(dict(num_train_timesteps=1000, shift=shift))
        flow_matching_loss(predict, latents, sigmas, torch.Generator().manual_seed(0))
        assert abs(float(seen[-1].median()) - median) < 0.02
    flow_matching_loss(
        predict,
        latents,
        flow_sigmas(dict(num_train_timesteps=1000, shift=1.0)),
        torch.Generator().manual_seed(0),
        weighting_scheme="uniform",
    )
    # uniform: a quarter of the sigmas below 0.25; logit-normal(0, 1): far fewer (~13%)
    assert abs(float((seen[-1] < 0.25).float().mean()) - 0.25) < 0.02
    assert float((seen[-2] < 0.25).float().mean()) < 0.16


# --- stages 1 and 2 on the tiny SD3 ---------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return DomainImageDataModule(str(root), resolution=64, batch_size=2)


def test_stage1_and_stage2_on_sd3(tmp_path, images):
    pipe = build_tiny_sd3(seed=0)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True
    )
    module = TextFeatureInversionModule(
        model_loader=lambda: pipe,
        optimizer=functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.0),
        domain="cat",
        output_dir=str(tmp_path / "out"),
    )
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=images)

    # stage 1: SD3's joint tokens (77 CLIP + 256 T5 slots) and pooled vector, from the prompt
    embeds, pooled = SD3.encode_prompt(build_tiny_sd3(seed=0), ["a photo of cat"])
    assert torch.equal(module.initial_features, embeds)
    assert module.text_features.shape == (1, 333, 64) and module.pooled_features.shape == (1, 64)
    assert not torch.equal(module.pooled_features.detach(), pooled)  # trained
    # the transformer got the features as its context, the pooled ones as pooled_projections,
    # and flow-matching timesteps (1000 * sigma, not integer DDPM steps)
    assert len(seen) == 2
    for call in seen:
        assert call["encoder_hidden_states"].shape == (2, 333, 64)
        assert call["pooled_projections"].shape == (2, 64)
        t = call["timestep"]
        assert t.dtype == torch.float32 and bool(((t > 0) & (t <= 1000)).all())
    assert torch.any(seen[0]["timestep"] != seen[0]["timestep"].round())
    features = tmp_path / "out" / "text_features.safetensors"
    assert torch.equal(load_text_features(features), module.text_features.detach().float())
    assert load_pooled_features(features).shape == (1, 64)

    # stage 2: the null-text transformer starts from that file, trains, exports, reloads
    stage2 = NullTextFinetuneModule(
        model_loader=lambda: build_tiny_sd3(seed=0),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        text_features=str(features),
        output_dir=str(tmp_path / "out2"),
    )
    stage2.setup("fit")
    domain = stage2.domain_unet
    assert isinstance(domain, NullTextSD3Transformer)
    assert torch.equal(domain.context_tokens, load_text_features(features)[0])
    start = domain.context_tokens.detach().clone()
    quiet_trainer(tmp_path, max_steps=2).fit(stage2, datamodule=images)
    assert not torch.equal(domain.context_tokens.detach(), start)  # learned
    meta = json.loads((tmp_path / "out2" / "domain_model" / "idgen_domain.json").read_text())
    assert meta["text_encoder_3"] is False  # the tiny SD3 has no T5
    back = load_domain_model(tmp_path / "out2" / "domain_model")
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(back(x, 400.0).sample, domain.eval()(x, 400.0).sample)


# --- the CLIs ------------------------------------------------------------------------------

FAST = [
    "experiment=demo",
    "model=tiny_sd3",
    "data.num_images=8",
    "data.batch_size=4",
    "inversion_steps=2",
    "trainer.max_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.decoupled_sampling.every_n_train_steps=2",
    "callbacks.decoupled_sampling.settings.num_inference_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sd3_train")
    train(job_config("train", tmp, FAST))
    return tmp / "run"


def test_train_tiny_sd3_runs_both_stages(trained):
    assert load_pooled_features(trained / "inversion" / "text_features.safetensors").shape == (
        1,
        64,
    )
    assert isinstance(load_domain_model(trained / "domain_model"), NullTextSD3Transformer)
    assert (trained / "base_grid.png").is_file()
    assert sorted((trained / "validation").glob("step_0000002_*.png"))
    assert sorted((trained / "checkpoints").glob("*.ckpt"))


def test_sample_tiny_sd3_with_the_domain_model(tmp_path, trained):
    cfg = compose_config(
        "sample",
        tmp_path,
        [
            "model=tiny_sd3",
            f"domain_model={trained / 'domain_model'}",
            "prompts=[a photo of a cat]",
            "images_per_prompt=2",
            "batch_size=2",
            "sampler.num_inference_steps=2",
        ],
    )
    summary = sample(cfg)
    images = sorted((Path(cfg.paths.output_dir) / "samples").glob("*.png"))
    assert summary["num_images"] == 2 and len(images) == 2
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("base", ["tiny", "tiny_sdxl"])
def test_sd3_domain_model_with_another_family_is_one_line(tmp_path, trained, base):
    cfg = compose_config(
        "sample", tmp_path, [f"model={base}", f"domain_model={trained / 'domain_model'}"]
    )
    with pytest.raises(UserInputError, match="model family sd3 \\(base model: sd(15|xl)\\)"):
        sample(cfg)


def test_flux_folder_as_base_is_one_line(tmp_path):
    folder = tmp_path / "flux"
    build_tiny_sd3().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    cfg = compose_config("sample", tmp_path, ["model=sd3", f"model.pretrained={folder}"])
    with pytest.raises(UserInputError, match="guidance-distilled"):
        sample(cfg)
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def trained_t5(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sd3_t5_train")
    train(job_config("train", tmp, [*FAST, "model.t5=true", "stage=all"]))
    return tmp / "run"


def test_domain_model_trained_with_t5_needs_a_base_with_t5(tmp_path, trained_t5):
    """The export records whether its SD3 base had T5; sampling it on a base without T5 (the
    tiny preset without t5, or a folder saved without text_encoder_3) is one line, and on the
    base it was trained with it samples."""
    domain = trained_t5 / "domain_model"
    assert json.loads((domain / "idgen_domain.json").read_text())["text_encoder_3"] is True
    folder = tmp_path / "no_t5"
    build_tiny_sd3().save_pretrained(folder)
    for base in (["model=tiny_sd3"], ["model=sd3", f"model.pretrained={folder}"]):
        cfg = compose_config("sample", tmp_path, [*base, f"domain_model={domain}"])
        with pytest.raises(UserInputError, match="with T5 \\(text_encoder_3\\), the base has no"):
            sample(cfg)
    ok = [
        "model=tiny_sd3",
        "model.t5=true",
        f"domain_model={domain}",
        "sampler.num_inference_steps=2",
    ]
    ok += ["prompts=[a photo of a cat]", "images_per_prompt=1", "batch_size=1"]
    assert sample(compose_config("sample", tmp_path / "ok", ok))["num_images"] == 1


def test_stage2_features_of_another_t5_setting_are_one_line(tmp_path, trained, trained_t5):
    """stage=finetune text_features=<file> on a base of another T5 setting stops in the
    preflight (the domain model would record the stage-2 base, so sampling's T5 check would
    pass on a base without the T5 its F^T was inverted with); the same setting passes."""
    from idgen import preflight

    with_t5 = trained_t5 / "inversion" / "text_features.safetensors"
    without_t5 = trained / "inversion" / "text_features.safetensors"
    folder = tmp_path / "no_t5"
    build_tiny_sd3().save_pretrained(folder)
    cases = [
        (["model=tiny_sd3"], with_t5, "with T5 (text_encoder_3), the base has no T5"),
        (["model=sd3", f"model.pretrained={folder}"], with_t5, "the base has no T5"),
        (["model=tiny_sd3", "model.t5=true"], without_t5, "without T5 (text_encoder_3), the base"),
        (["model=tiny"], without_t5, "model family sd3 (base model: sd15)"),
    ]
    for base, features, message in cases:
        cfg = compose_config("train", tmp_path, [*FAST, *base, "stage=finetune"])
        cfg.text_features = str(features)
        named = re.escape(f"text_features='{features}': were inverted on another base: ")
        with pytest.raises(UserInputError, match=named + ".*" + re.escape(message)):
            preflight.validate_train(cfg)
    for base, features in ((["model.t5=true"], with_t5), ([], without_t5)):
        cfg = compose_config("train", tmp_path, [*FAST, *base, "stage=finetune"])
        cfg.text_features = str(features.parent)  # the stage-1 folder works too
        preflight.validate_train(cfg)


def test_sd3_checkpoint_exports_as_the_run_did(tmp_path, trained):
    """`python -m idgen.modules.export CKPT OUT` rebuilds the SD3 null-text transformer from a
    checkpoint: the same weights as the run's own export (both EMA at the last step)."""
    from idgen.modules.export import export_from_checkpoint

    out = export_from_checkpoint(trained / "checkpoints" / "last.ckpt", tmp_path / "exported")
    ours, theirs = load_domain_model(out), load_domain_model(trained / "domain_model")
    assert isinstance(ours, NullTextSD3Transformer)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the objective decides what a stage builds -------------------------------------------------


class _Records(logging.Handler):
    """Every record a logger (and its children) emits, kept for the test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_sd3_stage_setup_builds_no_ddpm_table():
    """A stage on an SD3 base asks the family's objective (flow matching) and builds no
    DDPMScheduler from the flow-matching config, so diffusers' warning about its `shift` is gone
    at its cause; diffusers' logger itself is untouched (the probe shows it still warns)."""
    from diffusers import DDPMScheduler

    pipe = build_tiny_sd3(seed=0)
    seen = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(seen)
    try:
        DDPMScheduler.from_config(pipe.scheduler.config)  # the probe: what a DDPM table costs
        assert any(
            "{'shift': 3.0} were passed to DDPMScheduler" in r.getMessage() for r in seen.records
        )
        seen.records.clear()
        adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
        stage1 = TextFeatureInversionModule(model_loader=lambda: pipe, optimizer=adamw)
        stage1.setup("fit")
        stage2 = NullTextFinetuneModule(
            model_loader=lambda: build_tiny_sd3(seed=0), optimizer=adamw
        )
        stage2.setup("fit")
    finally:
        logger.removeHandler(seen)
    assert [r.getMessage() for r in seen.records if r.levelno >= logging.WARNING] == []
    for module in (stage1, stage2):
        assert torch.equal(module.flow_sigmas, flow_sigmas(pipe.scheduler.config))
        assert not hasattr(module, "alphas_cumprod")  # no DDPM table on a flow-matching base
        assert module.metadata()["prediction_type"] == "flow_matching"


def test_flow_matching_options_from_the_stage_config_reach_the_loss(tmp_path):
    """module.flow_matching.* (idgen/conf/module/finetune.yaml) sets SD3's timestep sampling and
    loss weighting: logit-normal(2, 0.5) sigmas through the shift and sigma^-2 weights, as the
    closed form with diffusers' own density gives them."""
    from hydra.utils import instantiate

    cfg = compose_config(
        "train",
        tmp_path,
        [
            "model=tiny_sd3",
            "module.flow_matching.logit_mean=2.0",
            "module.flow_matching.logit_std=0.5",
            "module.flow_matching.loss_weighting=sigma_sqrt",
        ],
    )
    module = instantiate(cfg.module, model_loader=None, memory=None, output_dir=str(tmp_path))
    assert module.flow_matching == {
        "logit_mean": 2.0,
        "logit_std": 0.5,
        "loss_weighting": "sigma_sqrt",
    }
    # what _setup_noise sets from the SD3 family (without loading the base)
    module.objective = "flow_matching"
    module.flow_sigmas = flow_sigmas(dict(num_train_timesteps=1000, shift=3.0))
    latents = torch.randn(6, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = {}

    def predict(noisy, t):
        seen["t"] = t
        return torch.full_like(noisy, 0.25)

    loss = module.loss_for(predict, latents, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = sample_noise(latents, g)
    u = compute_density_for_timestep_sampling("logit_normal", 6, 2.0, 0.5, generator=g)
    s = module.flow_sigmas[(u * 1000).long()]
    assert torch.allclose(seen["t"], 1000 * s)
    per_sample = ((0.25 - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (per_sample / s**2).mean(), rtol=1e-5)
    # the table descends (sigma 1 first) and is indexed by u as diffusers' SD3 scripts do, so
    # logit mean 2 (u ~ 0.88) draws low-noise sigmas, where logit mean 0 gives ~0.75
    assert float(s.median()) < 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny_sd3", "module.snr_gamma=5.0"], "module.snr_gamma=5.0: min-SNR weighting "),
        (["model=tiny_sd3", "inversion.snr_gamma=5.0"], "inversion.snr_gamma=5.0: min-SNR"),
        (["model=tiny", "module.flow_matching.loss_weighting=cosmap"], "flow-matching bases "),
        (["model=tiny_sd3", "module.flow_matching.weighting_scheme=lognorm"], "is not one of"),
        (["model=tiny_sd3", "inversion.flow_matching.logit_std=0"], "logit_std=0"),
    ],
)
def test_the_other_objectives_loss_options_are_one_line(tmp_path, overrides, message):
    """snr_gamma on a flow-matching base and flow_matching.* on a denoising base are errors
    naming the key before anything loads, never ignored; so is a scheme diffusers does not
    know (it would fall back to uniform sampling without a word)."""
    from idgen import preflight

    cfg = compose_config("train", tmp_path, ["experiment=demo", *overrides])
    with pytest.raises(UserInputError, match=re.escape(message)):
        preflight.validate_train(cfg)
    if "snr_gamma" in message:  # the module refuses it too (for Python users of the modules)
        module = TextFeatureInversionModule(
            model_loader=lambda: build_tiny_sd3(seed=0), optimizer=torch.optim.AdamW, snr_gamma=5.0
        )
        with pytest.raises(ValueError, match="snr_gamma=5.0 .*trained by flow matching"):
            module.setup("fit")


def test_a_finished_stage1_of_another_t5_setting_is_not_reused(trained_t5):
    """stage=all in a run dir whose stage 1 was inverted with T5, now on the same preset without
    T5 (same base name 'tiny'): one line naming the run dir, not a silent reuse; with T5 it is
    reused."""
    from idgen.train import finished_inversion

    # composed as `hydra.run.dir=<that run>` composes it (paths.output_dir = the run dir)
    cfg = compose_config("train", trained_t5.parent, [*FAST, "stage=all"])
    with pytest.raises(UserInputError, match="text_encoder_3 'true' \\(now 'false'\\)"):
        finished_inversion(cfg, trained_t5)
    cfg = compose_config("train", trained_t5.parent, [*FAST, "stage=all", "model.t5=true"])
    assert (
        finished_inversion(cfg, trained_t5)
        == trained_t5 / "inversion" / "text_features.safetensors"
    )
