"""Stage 2: null-text UNet fine-tuning — what trains, loss, checkpoints/resume, export, grids."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from idgen.callbacks.ema import EMAWeights
from idgen.models import NullTextUNet, build_tiny_sd
from idgen.modules import NullTextFinetuneModule, export_from_checkpoint
from idgen.modules.diffusion_loss import denoising_loss
from idgen.modules.ema import EMA
from idgen.modules.sd_parts import encode_images, save_text_features
from idgen.toyworld.demo import DemoDomainDataModule
from tests.conftest import quiet_trainer, tiny_finetune_module


def _trainer(tmp_path, max_steps: int, callbacks=(), ema: float | None = 0.9, **kw) -> L.Trainer:
    """``ema``: the decay of the EMAWeights callback added to ``callbacks`` (None: no EMA)."""
    callbacks = [*callbacks, *([EMAWeights(decay=ema)] if ema is not None else [])]
    return quiet_trainer(
        tmp_path,
        max_steps,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kw,
    )


def _data(tmp_path, n=8, batch=4):
    return DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=n, batch_size=batch)


class _FixedOrderDemo(DemoDomainDataModule):
    """Demo data in file order: DomainImageDataModule's shuffle generator is re-seeded per
    DataLoader, so a resumed run would replay epoch 0's order (a data-module matter, reported);
    the resume test checks the module's own state (weights, optimizer, EMA, noise stream)."""

    def train_dataloader(self) -> DataLoader:
        if not self.train_files:
            self.setup("fit")
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=False)


def _module(tmp_path, sd, lr=1e-3, **kw):
    return tiny_finetune_module(
        tmp_path / "out", sd, lr, weight_decay=0.0, domain="shapes", base_model="tiny", **kw
    )


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_the_null_text_unet_trains(tmp_path):
    sd = build_tiny_sd(seed=0)
    sd_before = {n: _state(getattr(sd, n)) for n in ("unet", "vae", "text_encoder")}
    module = _module(tmp_path, sd, train_embeddings=False)
    grads = set()

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update(n for n, p in pl_module.named_parameters() if p.grad is not None)

    L.seed_everything(0)
    module.setup("fit")
    start = _state(module.domain_unet)
    _trainer(tmp_path, 2, [Spy()]).fit(module, datamodule=_data(tmp_path))

    # gradients reach exactly the null-text UNet minus the frozen embeddings
    expected = {
        f"domain_unet.{n}" for n, p in module.domain_unet.named_parameters() if p.requires_grad
    }
    assert grads == expected and len(expected) > 0
    assert not any("domain_embedding" in n for n in grads)
    end = _state(module.domain_unet)
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    trainable = {k[len("domain_unet.") :] for k in expected}
    # Nothing frozen moves. Not every trainable weight must: the tiny UNet's mid-block
    # self-attention sees one token (1x1 latent), so its q/k gradients are exactly zero.
    assert changed <= trainable and len(changed) >= 0.9 * len(trainable)
    # the SD pipeline handed to the module is untouched
    for name, state in sd_before.items():
        for k, v in getattr(sd, name).state_dict().items():
            assert torch.equal(v, state[k]), f"{name}.{k} changed"
    assert not module.vae.training


def test_embeddings_train_when_enabled(tmp_path):
    module = _module(tmp_path, build_tiny_sd(seed=0), train_embeddings=True)
    L.seed_everything(0)
    module.setup("fit")
    start = [p.detach().clone() for p in module.domain_unet.embedding_parameters()]
    _trainer(tmp_path, 1).fit(module, datamodule=_data(tmp_path))
    after = module.domain_unet.embedding_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(start, after, strict=True))


def _fixed_loss(unet, sd, data) -> float:
    data.setup("fit")
    torch.manual_seed(0)
    latents = encode_images(sd.vae, torch.cat([b["pixel_values"] for b in data.train_dataloader()]))
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(sd.scheduler.config).alphas_cumprod
    with torch.no_grad():
        losses = [
            denoising_loss(
                lambda z, t: unet(z, t).sample,
                latents,
                ac,
                "epsilon",
                generator=torch.Generator().manual_seed(s),
            ).item()
            for s in range(4)
        ]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_loss_falls_on_the_demo_domain(tmp_path):
    sd = build_tiny_sd(seed=0)
    module = _module(tmp_path, sd, lr=2e-3)
    data = _data(tmp_path)
    L.seed_everything(0)
    module.setup("fit")
    initial = NullTextUNet.from_unet(sd.unet, module.text_features)
    _trainer(tmp_path, 20, ema=None).fit(module, datamodule=data)
    before, after = _fixed_loss(initial, sd, data), _fixed_loss(module.domain_unet, sd, data)
    assert after < 0.95 * before, (before, after)


def test_stage1_features_seed_the_embeddings(tmp_path):
    sd = build_tiny_sd(seed=0)
    feats = torch.randn(1, 77, 32)
    save_text_features(tmp_path / "tf.safetensors", feats, {"prompt": "x"})
    module = _module(tmp_path, sd, text_features=str(tmp_path / "tf.safetensors"))
    module.setup("fit")
    reference = NullTextUNet.from_unet(sd.unet, feats, init="value")
    for a, b in zip(
        module.domain_unet.embedding_parameters(), reference.embedding_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _ckpt_callback(tmp_path):
    return ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=2,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=True,
    )


@pytest.mark.slow
def test_checkpoint_holds_only_trained_state_and_resume_matches(tmp_path):
    """Stop at step 2, resume from last.ckpt to step 4: same weights/EMA as 4 steps at once."""
    data_root = tmp_path / "shared"

    def run(root, max_steps, ckpt_path=None):
        sd = build_tiny_sd(seed=0)
        module = _module(root, sd, lr=1e-3)
        L.seed_everything(0)
        trainer = _trainer(root, max_steps, [_ckpt_callback(root)])
        data = _FixedOrderDemo(root=str(data_root / "demo"), num_images=8, batch_size=4)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, trainer = run(tmp_path / "b", 4, ckpt_path="last")
    assert trainer.global_step == 4

    # checkpoint content: trained parts only
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert keys and all(k.startswith("domain_unet.") for k in keys)
    assert not any(k.startswith(("vae.", "unet.", "text_encoder.")) for k in keys)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"] and ckpt["ema"]["num_updates"] == 4
    # keep-newest-N: save_top_k=2 on "step" leaves steps 2 and 4 (+ last) after 4 steps...
    names = sorted(p.name for p in (tmp_path / "a" / "ckpt").glob("*.ckpt"))
    assert "last.ckpt" in names and len(names) == 3

    # resume equivalence (tolerance: float round-off of identical ops; observed 0)
    a, b = _state(straight.domain_unet), _state(resumed.domain_unet)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    for k, v in straight.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v, rtol=0, atol=1e-6, msg=k)


def test_export_loads_alone_and_holds_ema_weights(tmp_path):
    sd = build_tiny_sd(seed=0)
    module = _module(tmp_path, sd, export_on_fit_end=True)
    L.seed_everything(0)
    trainer = _trainer(tmp_path, 4, [_ckpt_callback(tmp_path)])
    trainer.fit(module, datamodule=_data(tmp_path))
    out = tmp_path / "out" / "domain_model"
    assert module.export_path == out
    loaded = NullTextUNet.from_pretrained(out)
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, module.ema.shadow[n], rtol=0, atol=0)
    assert (out / "text_features.safetensors").is_file() and (out / "README.md").is_file()
    # the EMA differs from the raw weights, and export from the checkpoint gives the same model
    raw = dict(module.domain_unet.named_parameters())
    assert any(not torch.equal(raw[n], s) for n, s in module.ema.shadow.items())
    again = export_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "from_ckpt")
    reloaded = NullTextUNet.from_pretrained(again)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(reloaded(x, t).sample, loaded(x, t).sample, rtol=0, atol=0)
    # a second export replaces the first completely, leaving no temp folders
    export_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", again, use_ema=False)
    assert not [p for p in again.parent.iterdir() if p.name.startswith(".")]


class _ModuleOwnedEMA(NullTextFinetuneModule):
    """The module as it was before EMAWeights: its own EMA, created at fit start, updated in
    optimizer_step and written as the top-level checkpoint["ema"]."""

    def on_fit_start(self) -> None:
        self.ema = EMA(self.domain_unet, 0.9, True)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.domain_unet)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ema"] = self.ema.state_dict()


@pytest.mark.slow
def test_checkpoint_of_module_owned_ema_resumes_into_the_callback(tmp_path):
    """A checkpoint written before EMA was a callback continues with EMAWeights to the same
    weights and EMA as 4 steps with the callback at once."""
    data_root = tmp_path / "shared"

    def run(root, max_steps, module_cls=NullTextFinetuneModule, ckpt_path=None):
        module = module_cls(
            model_loader=lambda: build_tiny_sd(seed=0),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
            domain="shapes",
            output_dir=str(root / "out"),
            export_on_fit_end=False,
        )
        L.seed_everything(0)
        ema = None if module_cls is _ModuleOwnedEMA else 0.9
        trainer = _trainer(root, max_steps, [_ckpt_callback(root)], ema=ema)
        data = _FixedOrderDemo(root=str(data_root / "demo"), num_images=8, batch_size=4)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2, module_cls=_ModuleOwnedEMA)
    old = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert old["ema"]["num_updates"] == 2 and old["ema"]["shadow"]
    resumed = run(tmp_path / "b", 4, ckpt_path="last")

    assert resumed.ema is not None and resumed.ema.num_updates == straight.ema.num_updates == 4
    for k, v in straight.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v, rtol=0, atol=1e-6, msg=k)
    a, b = _state(straight.domain_unet), _state(resumed.domain_unet)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # the callback writes the same format: top-level "ema", nothing of it under "callbacks"
    new = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert new["ema"].keys() == old["ema"].keys() and new["ema"]["num_updates"] == 4
    assert not any("EMAWeights" in str(key) for key in new.get("callbacks", {}))


def test_without_the_ema_callback_export_holds_the_raw_weights(tmp_path):
    """callbacks.ema=null (or ~callbacks.ema): no EMA anywhere; the export says "raw"."""
    import json

    from idgen.modules.export import METADATA_FILE
    from idgen.train import _callbacks
    from tests.conftest import compose_config

    for off in ("callbacks.ema=null", "~callbacks.ema"):
        cfg = compose_config("train", tmp_path / "cfg", [off])
        assert not any(isinstance(c, EMAWeights) for c in _callbacks(cfg, stage2=True))
    on = compose_config("train", tmp_path / "cfg", [])
    assert sum(isinstance(c, EMAWeights) for c in _callbacks(on, stage2=True)) == 1
    assert not any(isinstance(c, EMAWeights) for c in _callbacks(on, stage2=False))  # stage 1

    module = _module(tmp_path, build_tiny_sd(seed=0), export_on_fit_end=True)
    L.seed_everything(0)
    _trainer(tmp_path, 2, [_ckpt_callback(tmp_path)], ema=None).fit(
        module, datamodule=_data(tmp_path)
    )
    assert module.ema is None
    out = tmp_path / "out" / "domain_model"
    assert json.loads((out / METADATA_FILE).read_text())["weights"] == "raw"
    loaded = NullTextUNet.from_pretrained(out)
    raw = dict(module.domain_unet.named_parameters())
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, raw[n], rtol=0, atol=0)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True).get("ema") is None
    again = export_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "from_ckpt")
    assert json.loads((again / METADATA_FILE).read_text())["weights"] == "raw"


def test_ema_updates_once_per_optimizer_step_before_other_callbacks(tmp_path):
    """Under gradient accumulation too; a callback listed before EMAWeights (validation grids)
    still sees the EMA of the step it runs at."""
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, pl_module.ema.num_updates))

    module = _module(tmp_path, build_tiny_sd(seed=0))
    L.seed_everything(0)
    _trainer(tmp_path, 2, [Spy()], accumulate_grad_batches=2).fit(
        module, datamodule=_data(tmp_path, n=8, batch=2)
    )
    assert seen == [(0, 0), (1, 1), (1, 1), (2, 2)]


def test_ema_callback_needs_a_module_with_an_ema_target(tmp_path):
    # e.g. stage 1 or a baseline: nothing to average
    with pytest.raises(TypeError, match=r"ema_target\(\).*~callbacks\.ema"):
        EMAWeights.target(L.LightningModule())


def _validation_callback(tmp_path, every: int, steps: int, images: int = 1):
    """Fine-tuning's validation grids: the DecoupledGuidanceSampling callback (one path)."""
    from idgen.sampling import DecoupledGuidanceSampling, SamplerSettings

    return DecoupledGuidanceSampling(
        sd=functools.partial(build_tiny_sd, seed=0),
        settings=SamplerSettings(num_inference_steps=steps),
        out_dir=tmp_path / "out",
        every_n_train_steps=every,
        val_prompts=["a photo of a red circle"],
        val_images_per_prompt=images,
    )


def test_validation_grid_is_fixed_seed_png(tmp_path):
    import numpy as np
    from PIL import Image

    sd = build_tiny_sd(seed=0)
    module = _module(tmp_path, sd)
    sampling = _validation_callback(tmp_path, every=2, steps=3, images=4)
    L.seed_everything(0)
    trainer = _trainer(tmp_path, 2, callbacks=[sampling])
    trainer.fit(module, datamodule=_data(tmp_path))
    path = tmp_path / "out" / "validation" / "step_0000002_p0000.png"
    assert path.is_file()

    image = Image.open(path)
    # 2x2 grid of the 64px images enlarged to 256px (nearest, readable: issue 23), 2px gaps,
    # and below/above them the seeds and the caption
    assert image.size[0] == 2 * 256 + 3 * 2 and image.size[1] > 2 * 256 + 3 * 2
    assert image.text["caption"].startswith("a photo of")
    assert image.text["seed"] == "0"
    g1 = np.asarray(Image.open(sampling.validation_grids(trainer, module, 2)[0]).convert("RGB"))
    g2 = np.asarray(Image.open(sampling.validation_grids(trainer, module, 2)[0]).convert("RGB"))
    np.testing.assert_array_equal(g1, g2)


def test_short_run_still_ends_with_one_validation_grid(tmp_path):
    """Fewer steps (2) than every_n_train_steps (500, the config's default): one grid at the end,
    of the final weights, at a readable size."""
    from PIL import Image

    module = _module(tmp_path, build_tiny_sd(seed=0))
    sampling = _validation_callback(tmp_path, every=500, steps=2)
    L.seed_everything(0)
    _trainer(tmp_path, 2, callbacks=[sampling]).fit(module, datamodule=_data(tmp_path))
    grids = sorted((tmp_path / "out" / "validation").glob("*.png"))
    assert [p.name for p in grids] == ["step_0000002_p0000.png"]
    with Image.open(grids[0]) as png:
        assert png.text["step"] == "2" and min(png.size) >= 256


def test_bad_options_are_refused(tmp_path):
    sd = build_tiny_sd(seed=0)
    with pytest.raises(ValueError, match="init='mean'"):
        _module(tmp_path, sd, init="mean")
    with pytest.raises(ValueError, match="vae_dtype"):
        _module(tmp_path, sd, vae_dtype="float16")
    with pytest.raises(ValueError, match=r"callbacks\.ema\.decay=1\.5"):
        EMAWeights(decay=1.5)


def test_calibrated_init_from_cached_latents(tmp_path):
    """init='calibrated' takes its latents from the data module, here its latent cache."""
    sd = build_tiny_sd(seed=0)
    module = _module(tmp_path, sd, init="calibrated", calibration_batches=1, train_embeddings=False)
    data = DemoDomainDataModule(
        root=str(tmp_path / "demo"),
        num_images=8,
        batch_size=4,
        cache_latents=True,
        latent_cache_dir=str(tmp_path / "latents"),
    )
    L.seed_everything(0)
    _trainer(tmp_path, 1).fit(module, datamodule=data)
    assert "latent_params" in next(iter(data.train_dataloader()))
    assert module.domain_unet.config.init == "calibrated"
    value = NullTextUNet.from_unet(sd.unet, module.text_features, init="value")
    assert not torch.allclose(
        value.embedding_parameters()[0], module.domain_unet.embedding_parameters()[0]
    )


def test_validation_grid_is_logged_to_wandb(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    logged = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="idgen-test")
    monkeypatch.setattr(
        logger, "log_image", lambda key, images, step=None, **kw: logged.append((key, step))
    )
    module = _module(tmp_path, build_tiny_sd(seed=0))
    L.seed_everything(0)
    trainer = _trainer(tmp_path, 1, callbacks=[_validation_callback(tmp_path, every=1, steps=2)])
    trainer._loggers = [logger]  # _trainer() builds with logger=False
    try:
        trainer.fit(module, datamodule=_data(tmp_path))
    finally:
        import wandb

        wandb.finish()  # a later WandbLogger in this process must not reuse this run
    assert logged == [("validation/decoupled_grid", 1)]


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    import os

    from idgen.modules.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def killed(_fd):  # the process dies after the bytes went out, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
