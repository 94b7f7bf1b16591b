"""Sharded training configs (``trainer=fsdp``, ``trainer=deepspeed``): what they build, what
preflight refuses, how their checkpoint folders are resumed, and (on GPUs) a real FSDP run.

FSDP does not run on CPU here: Lightning 2.6 refuses it (``The strategy fsdp requires a GPU
accelerator``) and torch's FSDP raises ``FSDP needs a non-CPU accelerator device`` without
one, so the end-to-end run is ``gpu``-marked (``benchmarks/device_check.py`` machines).
DeepSpeed is CUDA-only in Lightning as well.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
from hydra.utils import instantiate

from idgen.utils.validation import ConfigError
from tests.conftest import job_config, run_python


def _strategy(tmp_path, trainer: str):
    return instantiate(job_config("train", tmp_path, ["experiment=demo", f"trainer={trainer}"]).trainer.strategy)  # fmt: skip


def test_fsdp_config_builds_full_shard_with_block_wrapping_and_checkpointing(tmp_path, tiny_sd):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = _strategy(tmp_path, "fsdp")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"
    policy = strategy.kwargs["auto_wrap_policy"]
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    for p in (policy, checkpointed):
        assert set(p._module_classes) == {BasicTransformerBlock, ResnetBlock2D}
    # the tiny UNet has both kinds of block, so both policies pick modules in it
    kinds = {type(m) for m in tiny_sd.unet.modules()}
    assert {BasicTransformerBlock, ResnetBlock2D} <= kinds


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed extra")
def test_deepspeed_config_builds_zero_stage_2_and_3(tmp_path):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = _strategy(tmp_path, "deepspeed")
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2
    cfg = job_config("train", tmp_path, ["trainer=deepspeed", "trainer.strategy.stage=3"])
    assert instantiate(cfg.trainer.strategy).zero_stage_3


# ------------------------------------------------------------------------------ preflight


def _validate(tmp_path, *overrides):
    from idgen.preflight import check_strategy

    check_strategy(job_config("train", tmp_path, ["experiment=demo", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["trainer.strategy=ddpp"], "trainer.strategy='ddpp'", "is not a Lightning strategy"),
        (["trainer=fsdp", "trainer.devices=1", "~callbacks.ema"], "trainer.devices=1", "is 1"),
        (["trainer=fsdp", "trainer.devices=2"], "callbacks.ema=", "one shard"),
        (
            ["trainer=ddp", "trainer.strategy._target_=lightning.pytorch.strategies.NoSuch"],
            "trainer.strategy._target_=",
            "not an importable strategy class",
        ),
    ],
)
def test_bad_strategies_get_one_clear_line(tmp_path, overrides, field, says):
    with pytest.raises(ConfigError) as err:
        _validate(tmp_path, *overrides)
    message = str(err.value)
    assert message.startswith(field) and says in message and "\n" not in message


def test_deepspeed_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"^trainer='deepspeed': needs the deepspeed package.*idgen\[deepspeed\]"):  # fmt: skip
        _validate(tmp_path, "trainer=deepspeed", "trainer.devices=2", "~callbacks.ema")


def test_good_strategies_pass(tmp_path):
    _validate(tmp_path)  # trainer=cpu: no strategy
    _validate(tmp_path, "trainer=ddp_sim")
    _validate(tmp_path, "trainer.strategy=ddp")
    _validate(
        tmp_path, "trainer=fsdp", "trainer.devices=1", "trainer.num_nodes=2", "~callbacks.ema"
    )


# ------------------------------------------------------------------------------ checkpoint folders


def test_sharded_checkpoint_folders_are_found_and_resumed_from(tmp_path):
    """FSDP's sharded checkpoint is a folder (shards + ``meta.pt``, written last): the newest
    complete one wins ``ckpt_path=last``; a folder without its metadata (killed) never does."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from idgen.modules.checkpoint_io import (
        checkpoint_step,
        newest_complete_checkpoint,
        pending_log,
    )

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 4}, ckpts / "step_4.ckpt")  # a one-file checkpoint, older
    folder = ckpts / "step_6.ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"shard")
    row = {"step": 6, "metrics": {"train/loss": 0.5}}
    meta = {"global_step": 6, "callbacks": {"ModelCheckpoint": {"pending_log": row}}}
    torch.save(meta, folder / _METADATA_FILENAME)
    killed = ckpts / "step_8.ckpt"
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"shard")
    assert checkpoint_step(folder) == 6 and checkpoint_step(killed) is None
    assert newest_complete_checkpoint(ckpts) == (folder, 6)
    assert pending_log(folder) == row


# ------------------------------------------------------------------------------ on GPUs

FSDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from idgen.modules.checkpoint_io import newest_complete_checkpoint
    from idgen.toyworld.demo import DemoDomainDataModule
    from tests.conftest import job_config, quiet_trainer, tiny_finetune_module

    out = Path(sys.argv[1])
    devices = min(2, torch.cuda.device_count())

    def fit(steps, ckpt_path=None):
        L.seed_everything(0)
        cfg = job_config("train", out, ["experiment=demo", "trainer=fsdp"])
        strategy = instantiate(cfg.trainer.strategy)
        checkpoint = ModelCheckpoint(
            dirpath=out / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="step_{step}"
        )
        module = tiny_finetune_module(out / "run", export_on_fit_end=True)
        trainer = quiet_trainer(
            out / "run", steps, accelerator="gpu", devices=devices, strategy=strategy,
            precision="bf16-mixed", callbacks=[checkpoint], enable_checkpointing=True,
        )
        data = DemoDomainDataModule(root=str(out / "demo"), num_images=16, batch_size=2)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    fit(2)
    found = newest_complete_checkpoint(out / "ckpt")
    assert found is not None and found[0].is_dir() and found[1] == 2, found
    trainer = fit(4, ckpt_path=str(found[0]))
    if trainer.is_global_zero:
        from idgen.models import NullTextUNet

        unet = NullTextUNet.from_pretrained(out / "run" / "domain_model")
        assert all(torch.isfinite(p).all() for p in unet.parameters())
        (out / "ok").write_text(str(trainer.global_step))
    """
)


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp_trains_resumes_from_a_sharded_checkpoint_and_exports(tmp_path):
    if not torch.cuda.is_available():  # IDGEN_GPU_TEST_DEVICE=cpu dry runs: FSDP has no CPU path
        pytest.skip("FSDP needs CUDA (Lightning and torch refuse it on CPU)")
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_SCRIPT)
    result = run_python([str(script), str(tmp_path)], tmp_path, root=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "ok").read_text() == "4"
