"""Memory options and the memory plan: optimizers (fused backward pass), EMA placement, the
validation grids' shared SD, plan counts against independent counts, and bad input."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from idgen.callbacks.ema import EMAWeights
from idgen.memory.optim import FusedBackwardOptimizer, build_optimizer, fused_backward_optimizer
from idgen.memory.plan import optimizer_state_bytes
from idgen.memory.settings import MemorySettings, check_run
from idgen.memory.sizes import sizes_from_layout
from idgen.models.layouts import SD15_UNET
from idgen.modules.ema import EMA
from idgen.toyworld.demo import DemoDomainDataModule
from idgen.utils.validation import ConfigError
from tests.conftest import job_config, quiet_trainer, tiny_finetune_module

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)


def _train_tiny(tmp_path, memory: dict, steps: int = 3, callbacks=()):
    """The tiny null-text UNet after ``steps`` steps with ``memory`` options (same seed, data)."""
    import lightning as L

    L.seed_everything(0)
    module = tiny_finetune_module(tmp_path / "out", lr=1e-2, memory=memory)
    data = DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=4, batch_size=2)
    trainer = quiet_trainer(tmp_path, steps, callbacks=list(callbacks), limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_fused_backward_adamw_gives_the_weights_of_the_usual_adamw_step(tmp_path):
    """Stepping each parameter in its gradient hook is the same update as AdamW's step after
    the whole backward pass: same weights after 3 steps, within float32 rounding."""
    plain, _ = _train_tiny(tmp_path / "a", {"optimizer": "adamw"})
    fused, trainer = _train_tiny(tmp_path / "b", {"optimizer": "adamw", "fused_backward": True})
    assert isinstance(trainer.optimizers[0], FusedBackwardOptimizer)
    start = tiny_finetune_module(tmp_path / "c")
    start.setup("fit")
    moved = 0
    for (name, a), b, s in zip(
        plain.domain_unet.named_parameters(),
        fused.domain_unet.parameters(),
        start.domain_unet.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, s))
        assert b.grad is None  # no gradient is kept after its update
    assert moved > 0.9 * len(list(start.domain_unet.parameters()))


def test_fused_backward_state_round_trips_through_state_dict():
    """A checkpointed fused optimizer continues exactly as the one that was not interrupted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 4)
    opt = fused_backward_optimizer("adamw", model.parameters(), ADAMW)
    for _ in range(2):
        opt.step(lambda: model(x).square().mean().backward())
    state = copy.deepcopy(opt.state_dict())  # (a state_dict shares the live tensors)
    assert len(state["state"]) == 4 and {"exp_avg", "exp_avg_sq"} <= set(state["state"][0])
    twin.load_state_dict(model.state_dict())
    opt2 = fused_backward_optimizer("adamw", twin.parameters(), ADAMW)
    opt2.load_state_dict(state)
    opt.param_groups[0]["lr"] = opt2.param_groups[0]["lr"] = 5e-3  # a scheduler's change
    opt.step(lambda: model(x).square().mean().backward())
    opt2.step(lambda: twin(x).square().mean().backward())
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "adafactor", "adamw8bit"])
def test_optimizer_state_bytes_match_the_real_optimizer(name):
    """The plan's optimizer-state bytes against the state a real step creates (8-bit AdamW:
    when bitsandbytes is installed, ``pip install 'idgen[memory]'``)."""
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # big enough for bitsandbytes' 8-bit states (tensors of >= 4096 elements), small ones too
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.Flatten(), nn.Linear(128 * 6 * 6, 5))
    opt = build_optimizer(name, model.parameters(), ADAMW)
    model(torch.randn(2, 64, 8, 8)).sum().backward()
    opt.step()
    real = sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for k, t in state.items()
        # bitsandbytes' quantisation maps (qmap*) are shared constants, not per-parameter state
        if torch.is_tensor(t) and k != "step" and not k.startswith("qmap") and t.numel() > 1
    )
    planned = optimizer_state_bytes(name, [tuple(p.shape) for p in model.parameters()])
    assert planned == real


def test_plan_counts_match_the_models_built_on_meta():
    """SD1.5's published UNet size, and the null-text UNet's trainable parameters counted by
    building NullTextUNet itself (the plan derives them from the UNet's shapes)."""
    from idgen.models import NullTextUNet

    sizes = sizes_from_layout("sd15")
    assert sizes.denoiser_params == 859_520_964
    with torch.device("meta"):
        domain = NullTextUNet(unet_config=dict(SD15_UNET))
    assert sizes.domain_params == sum(p.numel() for p in domain.parameters())
    assert sizes.vae_params == 83_653_863
    assert sizes.text_encoder_params == 123_060_480
    xl = sizes_from_layout("sdxl")
    assert xl.denoiser_params == 2_567_463_684


def test_ema_swap_uses_no_copy_and_restores_the_weights():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    raw = model.weight.detach().clone()
    pointer = model.weight.data_ptr()
    with ema.swapped_in(model):
        torch.testing.assert_close(model.weight, raw - 0.5)
    assert model.weight.data_ptr() == pointer and torch.equal(model.weight, raw)


def test_ema_every_k_steps_applies_k_steps_of_decay_and_cpu_bf16_placement():
    model = nn.Linear(2, 2)
    start = model.weight.detach().clone()
    ema = EMA(model, decay=0.9, warmup=False, dtype=torch.bfloat16, device="cpu", every=3)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert ema.shadow["weight"].dtype == torch.bfloat16
    expected = start + (1 - 0.9**3) * 1.0
    torch.testing.assert_close(ema.shadow["weight"].float(), expected, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"memory\.ema_every=\d+ or more"):
        EMAWeights(decay=0.9999, placement="cpu", dtype="bfloat16", every_n_steps=1)


def test_ema_off_keeps_the_raw_weights(tmp_path):
    module, _ = _train_tiny(tmp_path, {}, steps=1, callbacks=[EMAWeights(placement="off")])
    assert module.ema is None


def test_validation_grids_reuse_the_modules_frozen_sd(tmp_path):
    """The grid callback samples with the training module's own frozen parts: its ``sd``
    loader is never called, and the kept base pipeline's VAE is the module's."""
    from idgen.sampling import DecoupledGuidanceSampling, SamplerSettings

    def second_copy():
        raise AssertionError("the callback loaded a second SD")

    grids = DecoupledGuidanceSampling(
        sd=second_copy,
        settings=SamplerSettings(num_inference_steps=2),
        out_dir=tmp_path / "grids",
        every_n_train_steps=1,
        val_prompts=["a photo of shapes"],
        val_images_per_prompt=1,
    )
    module, _ = _train_tiny(tmp_path, {"frozen_dtype": "bfloat16"}, steps=1, callbacks=[grids])
    assert (tmp_path / "grids" / "validation" / "step_0000001_p0000.png").is_file()
    base = module.sampling_pipeline()
    assert base.vae is module.vae and base.unet.dtype == torch.bfloat16


def test_memory_low_trains_the_tiny_model_through_idgen_train(tmp_path):
    """memory=low end to end (bfloat16 frozen parts, checkpointing, fused Adafactor, no EMA):
    the exported domain model differs from the base copy and holds finite weights."""
    from idgen.models import NullTextUNet
    from idgen.train import train

    cfg = job_config(
        "train",
        tmp_path,
        ["memory=low", "stage=finetune", "trainer.max_steps=2", "preview.enabled=false"],
    )
    assert cfg.memory.fused_backward and cfg.trainer.gradient_clip_val is None
    train(cfg)
    unet = NullTextUNet.from_pretrained(tmp_path / "run" / "domain_model")
    assert all(bool(torch.isfinite(p).all()) for p in unet.parameters())


def test_plan_true_prints_the_table_and_trains_nothing(tmp_path, capsys):
    from idgen.train import train

    cfg = job_config("train", tmp_path, ["plan=true"])
    assert train(cfg) == {}
    out = capsys.readouterr().out
    assert "memory plan: stage inversion" in out and "memory plan: stage finetune" in out
    assert "24 GB GPU: fits" in out
    assert not (tmp_path / "run" / "inversion").exists()


def test_plan_of_sdxl_true_size_needs_the_low_settings_for_24_gb(tmp_path, capsys):
    from idgen.train import train

    cfg = job_config(
        "train",
        tmp_path,
        # a GPU run planned on this CPU machine: plan=... needs neither the data nor CUDA
        ["plan=sdxl", "trainer=gpu", "stage=finetune", "data.resolution=1024", "data.batch_size=1"],
    )
    train(cfg)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("24 GB GPU"))
    assert "fits with" in line and "memory.fused_backward=true" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["memory.optimizer=lion"], "memory.optimizer='lion': is not a known choice"),
        (["+memory.color=red"], "memory.color='red': is not a memory option"),
        (["trainer.precision=16-mixed"], "float16 autocast does not run on CPU"),
        (["memory.fused_backward=true"], "trainer.gradient_clip_val=1.0: global-norm clipping"),
        (
            ["memory=low", "trainer.accumulate_grad_batches=2"],
            "trainer.accumulate_grad_batches=2: gradient accumulation",
        ),
    ],
)
def test_bad_memory_options_are_one_clear_error_before_heavy_work(tmp_path, overrides, message):
    from idgen.train import train

    cfg = job_config("train", tmp_path, overrides)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "run" / "data_grid.png").exists()


def test_8bit_adamw_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'idgen\[memory\]'"):
        MemorySettings.from_config({"optimizer": "adamw8bit"})


def test_a_run_that_cannot_fit_stops_with_the_plan(tmp_path, monkeypatch):
    from idgen.memory import check
    from idgen.train import train

    monkeypatch.setattr(check, "free_bytes", lambda accelerator: (1e8, "available RAM"))
    cfg = job_config("train", tmp_path, [])
    with pytest.raises(check.MemoryPlanError, match=r"needs about [\d.]+ GB but available RAM"):
        train(cfg)
    assert not (tmp_path / "run" / "data_grid.png").exists()


def test_fused_backward_is_refused_across_devices():
    with pytest.raises(ConfigError, match="before DDP has averaged"):
        check_run(MemorySettings(fused_backward=True), {"devices": 2, "gradient_clip_val": None})


def test_sharded_strategies_log_the_plan_without_stopping(tmp_path, monkeypatch):
    """Under FSDP/DeepSpeed each device holds a shard: the one-device plan is not enforced."""
    from idgen.memory import check

    cfg = job_config("train", tmp_path, ["trainer=fsdp", "stage=finetune"])
    assert check._sharded(cfg)
    assert not check._sharded(job_config("train", tmp_path, []))
    monkeypatch.setattr(check, "free_bytes", lambda accelerator: (1e8, "free GPU memory"))
    assert check.plan_or_stop(cfg) is False
