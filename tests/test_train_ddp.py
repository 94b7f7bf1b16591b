"""Null-text fine-tuning under DDP: 2 gloo CPU processes, no find_unused_parameters."""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.conftest import run_python

SCRIPT = textwrap.dedent(
    """
    import functools, sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from idgen.callbacks.ema import EMAWeights
    from idgen.toyworld.demo import DemoDomainDataModule
    from tests.conftest import quiet_trainer, tiny_finetune_module
    from idgen.models import build_tiny_sd
    from idgen.sampling import DecoupledGuidanceSampling, SamplerSettings

    out = Path(sys.argv[1])
    L.seed_everything(0)
    module = tiny_finetune_module(out / "run", export_on_fit_end=True)
    sampling = DecoupledGuidanceSampling(
        sd=functools.partial(build_tiny_sd, seed=0),
        settings=SamplerSettings(num_inference_steps=2),
        out_dir=out / "run",
        every_n_train_steps=2,
        val_prompts=["a photo of a red circle"],
    )
    trainer = quiet_trainer(
        out / "run", 3, devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=False),
        callbacks=[sampling, EMAWeights(decay=0.9)], num_sanity_val_steps=0, limit_val_batches=0,
    )
    data = DemoDomainDataModule(root=str(out / "demo"), num_images=16, batch_size=4)
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    state = {k: v.detach().clone() for k, v in module.domain_unet.state_dict().items()}
    torch.save(
        {"weights": state, "ema": module.ema.state_dict()["shadow"], "step": trainer.global_step,
         "world": trainer.world_size},
        out / f"rank{rank}.pt",
    )
    """
)


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    result = run_python([str(script), str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    for key in ("weights", "ema"):
        assert r0[key].keys() == r1[key].keys()
        for name, value in r0[key].items():
            assert torch.equal(value, r1[key][name]), f"{key} {name} differs between ranks"
    # training moved the weights (the test would be vacuous otherwise)
    from idgen.models import NullTextUNet, build_tiny_sd

    start = NullTextUNet.from_unet(build_tiny_sd(seed=0).unet, torch.zeros(1, 77, 32)).state_dict()
    assert any(
        not torch.equal(v, start[k])
        for k, v in r0["weights"].items()
        if "domain_embedding" not in k
    )
    # the validation grid was written once, by rank 0
    assert (tmp_path / "run" / "validation" / "step_0000002_p0000.png").is_file()


@pytest.mark.slow
def test_idgen_train_demo_under_ddp_sim(tmp_path):
    """The CLI under trainer=ddp_sim: Lightning relaunches the Hydra job; both stages finish."""
    overrides = [
        "experiment=demo",
        "trainer=ddp_sim",
        "data.num_images=16",
        "data.batch_size=4",
        "inversion_steps=2",
        "trainer.max_steps=2",
        "preview.enabled=false",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.decoupled_sampling.every_n_train_steps=2",
        "callbacks.decoupled_sampling.settings.num_inference_steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_python(["-m", "idgen.train", *overrides], tmp_path, root=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "run"
    assert (run / "inversion" / "text_features.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    from idgen.models import NullTextUNet

    NullTextUNet.from_pretrained(run / "domain_model")
