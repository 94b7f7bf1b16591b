"""data.val_fraction is read: held-out images give val/loss, and holding them out (or validating)
changes no training step."""

from __future__ import annotations

import math

import lightning as L
import torch

from idgen.toyworld.demo import DemoDomainDataModule
from tests.conftest import tiny_finetune_module


def _fit(tmp_path, validate: bool):
    module = tiny_finetune_module(tmp_path / "out")
    # 8 images, 2 held out: 3 training batches an epoch, validation after steps 3 and 6
    data = DemoDomainDataModule(
        root=str(tmp_path / "demo"), num_images=8, batch_size=2, val_fraction=0.25, random_flip=True
    )
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=7,
        max_epochs=-1,
        check_val_every_n_epoch=None,  # idgen/conf/trainer/default.yaml
        val_check_interval=None,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer, module, data


def test_val_loss_is_logged_and_leaves_training_alone(tmp_path):
    trainer, module, data = _fit(tmp_path, validate=True)
    assert len(data.val_files) == 2 and not set(data.val_files) & set(data.train_files)
    val = float(trainer.callback_metrics["val/loss"])
    assert math.isfinite(val) and val > 0
    plain_trainer, plain, _ = _fit(tmp_path, validate=False)
    assert "val/loss" not in plain_trainer.callback_metrics
    for (name, a), b in zip(
        module.domain_unet.state_dict().items(),
        plain.domain_unet.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    # the same weights give the same val/loss (fixed noise per held-out batch)
    again = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert again == trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
