"""Stage 1: text-feature inversion on the tiny SD and the generated demo domain."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler

from idgen.models import build_tiny_sd
from idgen.modules import TextFeatureInversionModule
from idgen.modules.diffusion_loss import add_noise, denoising_target, min_snr_weights, snr
from idgen.modules.sd_parts import load_text_features, read_text_features_metadata
from idgen.toyworld.demo import DemoDomainDataModule
from tests.conftest import quiet_trainer


def _trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, max_steps, **kw)


def _data(tmp_path, n=16, batch=8):
    return DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=n, batch_size=batch)


def _module(tmp_path, sd, lr=5e-2, **kw):
    return TextFeatureInversionModule(
        model_loader=lambda: sd,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        domain="shapes",
        output_dir=str(tmp_path / "out"),
        base_model="tiny",
        **kw,
    )


# --- pure loss math against diffusers' own scheduler -------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_and_targets_match_diffusers(prediction_type):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = add_noise(sched.alphas_cumprod, x0, eps, t)
    torch.testing.assert_close(ours, sched.add_noise(x0, eps, t))
    target = denoising_target(prediction_type, sched.alphas_cumprod, x0, eps, t)
    expected = {"epsilon": eps, "v_prediction": sched.get_velocity(x0, eps, t), "sample": x0}
    torch.testing.assert_close(target, expected[prediction_type])


def test_min_snr_weights_closed_form():
    ac = torch.tensor([0.99, 0.5, 0.01])
    t = torch.arange(3)
    s = snr(ac, t)
    torch.testing.assert_close(s, ac / (1 - ac))
    gamma = 5.0
    torch.testing.assert_close(min_snr_weights(s, gamma, "epsilon"), torch.clamp(s, max=gamma) / s)
    torch.testing.assert_close(
        min_snr_weights(s, gamma, "v_prediction"), torch.clamp(s, max=gamma) / (s + 1)
    )


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        denoising_target(
            "flow",
            torch.ones(10),
            torch.ones(1, 4),
            torch.ones(1, 4),
            torch.zeros(1, dtype=torch.long),
        )


# --- the module -------------------------------------------------------------------------------
def test_only_text_features_get_gradients_and_change(tmp_path):
    sd = build_tiny_sd(seed=0)
    frozen_before = {
        name: {k: v.clone() for k, v in getattr(sd, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    module = _module(tmp_path, sd)
    seen_grads = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for n, p in pl_module.named_parameters():
                if p.grad is not None:
                    seen_grads[n] = p.grad.abs().sum().item()

    L.seed_everything(0)
    _trainer(tmp_path, max_steps=3, callbacks=[Spy()]).fit(module, datamodule=_data(tmp_path, 8, 4))
    assert list(seen_grads) == ["text_features"] and seen_grads["text_features"] > 0
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["text_features"]
    assert not module.unet.training and not module.vae.training
    assert not torch.equal(module.text_features.detach(), module.initial_features)
    for name, state in frozen_before.items():
        for k, v in getattr(sd, name).state_dict().items():
            assert torch.equal(v, state[k]), f"{name}.{k} changed"

    # the result file: the trained features + metadata
    path = tmp_path / "out" / "text_features.safetensors"
    torch.testing.assert_close(
        load_text_features(path), module.text_features.detach(), rtol=0, atol=0
    )
    meta = read_text_features_metadata(path)
    assert meta["prompt"] == "a photo of shapes" and meta["base_model"] == "tiny"
    assert int(meta["steps"]) == 3
    assert not list((tmp_path / "out").glob(".*.tmp"))


def _eval_loss(module, sd, data, features, seeds=4):
    """Mean denoising loss over fixed noise draws with the given features (frozen everything)."""
    from idgen.modules.diffusion_loss import denoising_loss
    from idgen.modules.sd_parts import encode_images

    data.setup("fit")
    ac = DDPMScheduler.from_config(sd.scheduler.config).alphas_cumprod
    torch.manual_seed(123)
    px = torch.cat([b["pixel_values"] for b in data.train_dataloader()])
    latents = encode_images(sd.vae, px)
    total = 0.0
    with torch.no_grad():
        for s in range(seeds):
            g = torch.Generator().manual_seed(s)
            total += denoising_loss(
                lambda z, t: (
                    sd.unet(z, t, encoder_hidden_states=features.expand(z.shape[0], -1, -1)).sample
                ),
                latents,
                ac,
                "epsilon",
                generator=g,
            ).item()
    return total / seeds


def test_loss_falls_on_a_short_fixed_seed_run(tmp_path):
    sd = build_tiny_sd(seed=0)
    module = _module(tmp_path, sd)
    data = _data(tmp_path, n=8, batch=4)
    L.seed_everything(0)
    _trainer(tmp_path, max_steps=20).fit(module, datamodule=data)
    before = _eval_loss(module, sd, data, module.initial_features)
    after = _eval_loss(module, sd, data, module.text_features.detach())
    assert after < before, (before, after)


def test_v_prediction_scheduler_is_used(tmp_path):
    sd = build_tiny_sd(seed=0)
    sd.scheduler = sd.scheduler.__class__.from_config(
        sd.scheduler.config, prediction_type="v_prediction"
    )
    module = _module(tmp_path, sd)
    L.seed_everything(0)
    _trainer(tmp_path, max_steps=1).fit(module, datamodule=_data(tmp_path, n=8))
    assert module.prediction_type == "v_prediction"
    assert (
        read_text_features_metadata(tmp_path / "out" / "text_features.safetensors")[
            "prediction_type"
        ]
        == "v_prediction"
    )


def test_bad_config_values_are_refused(tmp_path):
    sd = build_tiny_sd(seed=0)
    with pytest.raises(ValueError, match="prompt_template"):
        _module(tmp_path, sd, prompt_template="a photo")
    with pytest.raises(ValueError, match="float16"):
        _module(tmp_path, sd, frozen_dtype="float16")
    with pytest.raises(ValueError, match="frozen_dtype='int8'"):
        _module(tmp_path, sd, frozen_dtype="int8")


def test_missing_text_features_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_text_features(tmp_path / "nope.safetensors")
