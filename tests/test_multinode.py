"""Multi-node through Lightning's own environment: a run split over processes is the one-process
run at the same global batch.

Each rank takes rows ``rank, rank + world, ...`` of the one-process batch
(``EpochSeededSampler``), and every random draw of a training step (the VAE's sampling noise, the
diffusion noise, the timesteps) is made for the global batch from one stream shared by all ranks,
each keeping its rows. So the pieces are checked here on their own (fast), and end to end through
the real ``idgen-train`` and ``idgen-sample`` as 2 "nodes" x 1 process over gloo on localhost:
two processes with ``NODE_RANK=0/1`` and the same ``MASTER_ADDR``/``MASTER_PORT`` (slow).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import run_python

# ------------------------------------------------------------------------------ the pieces


def test_sampler_shards_are_the_one_process_batches():
    """Ranks' batch b together == the one-process batch b at world x the batch size."""
    from idgen.data.datamodule import EpochSeededSampler

    data = list(range(22))  # not a multiple of the world: padded as DistributedSampler pads
    for world, per_rank in ((2, 3), (4, 2)):
        one = list(EpochSeededSampler(data, seed=5, num_replicas=1, rank=0))
        shards = [list(EpochSeededSampler(data, seed=5, num_replicas=world, rank=r)) for r in range(world)]  # fmt: skip
        assert all(len(s) == len(shards[0]) for s in shards)  # equal shares, padded
        assert {i for s in shards for i in s} == set(data)
        global_batch = world * per_rank
        for b in range(len(data) // global_batch):
            together = sorted(i for s in shards for i in s[b * per_rank : (b + 1) * per_rank])
            assert together == sorted(one[b * global_batch : (b + 1) * global_batch])


def test_sampler_epochs_differ_and_resume_skips_within_the_shard():
    from idgen.data.datamodule import EpochSeededSampler

    sampler = EpochSeededSampler(list(range(10)), seed=0, num_replicas=2, rank=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and len(first) == len(second) == 5
    sampler.resume(1, 2)
    assert list(sampler) == second[2:]


def test_loss_draws_are_the_rows_of_the_one_process_draws():
    """Noise and timesteps a rank sees are its rows of what one process draws for all rows."""
    from idgen.modules.diffusion_loss import denoising_loss

    alphas = torch.linspace(0.99, 0.01, 1000)
    latents = torch.randn(4, 4, 8, 8)
    seen = {}

    def predict(key):
        def run(noisy, t):
            seen[key] = (noisy.clone(), t.clone())
            return torch.zeros_like(noisy)

        return run

    def loss(key, rows, shard):
        gen = torch.Generator().manual_seed(3)
        return denoising_loss(
            predict(key), latents[rows], alphas, "epsilon", gen, noise_offset=0.1, shard=shard
        )

    one = loss("one", slice(None), (0, 1))
    parts = [loss(r, slice(r, None, 2), (r, 2)) for r in range(2)]
    for r in range(2):
        assert torch.equal(seen[r][1], seen["one"][1][r::2])
        assert torch.allclose(seen[r][0], seen["one"][0][r::2], atol=1e-6, rtol=0)
    # zero prediction, epsilon target: the loss is the mean squared noise, averaged as DDP does
    assert torch.allclose(one, (parts[0] + parts[1]) / 2, atol=1e-6, rtol=0)


def test_vae_sampling_noise_is_the_rows_of_the_one_process_draw(tiny_sd):
    from idgen.data.latents import latents_from_batch

    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        one = latents_from_batch(
            {"pixel_values": pixels}, tiny_sd.vae, torch.Generator().manual_seed(1)
        )
        for r in range(2):
            part = latents_from_batch(
                {"pixel_values": pixels[r::2]},
                tiny_sd.vae,
                torch.Generator().manual_seed(1),
                (r, 2),
            )
            torch.testing.assert_close(part, one[r::2], atol=1e-5, rtol=0)
        # and the draw is random: another seed gives other latents
        other = latents_from_batch(
            {"pixel_values": pixels}, tiny_sd.vae, torch.Generator().manual_seed(2)
        )
    assert (other - one).abs().max() > 1e-3


# ------------------------------------------------------------------------------ end to end

TRAIN = [
    "experiment=demo",
    "data.num_images=16",
    "data.random_flip=false",  # flips are drawn per sample from each process's global RNG
    "inversion_steps=2",
    "trainer.max_steps=3",
    "preview.enabled=false",
    "callbacks.progress_bar.refresh_rate=0",
    "callbacks.decoupled_sampling.every_n_train_steps=100",
]
SAMPLE = ["images_per_prompt=3", "batch_size=2", "sampler.num_inference_steps=3"]
TWO_NODES = ["trainer=ddp_sim", "trainer.devices=1", "trainer.num_nodes=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(args: list[str], tmp_path: Path) -> list:
    """``python <args>`` as node 0 and node 1 of Lightning's environment, at the same time."""
    port = str(_free_port())

    def node(rank: int):
        env = dict(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        return run_python(args, tmp_path, root=tmp_path, **env)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(node, (0, 1)))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"node {rank}:\n{result.stderr[-4000:]}"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in results[1].stderr  # one run of world size 2
    return results


def _max_diff(a: Path, b: Path) -> tuple[float, float, int]:
    """(max abs difference, fraction of elements differing by > 1e-6, elements) of two
    safetensors files."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    diff = torch.cat([(x[k].float() - y[k].float()).abs().flatten() for k in x])
    return diff.max().item(), (diff > 1e-6).float().mean().item(), diff.numel()


@pytest.mark.slow
def test_two_nodes_train_and_sample_as_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # 1. Training: one process at batch 4 vs 2 nodes x 1 process at batch 2 (global batch 4).
    single = run_python(
        ["-m", "idgen.train", *TRAIN, "data.batch_size=4", f"hydra.run.dir={one}"],
        tmp_path,
        root=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    run_two_nodes(
        ["-m", "idgen.train", *TRAIN, *TWO_NODES, "data.batch_size=2", f"hydra.run.dir={two}"],
        tmp_path,
    )
    features = "inversion/text_features.safetensors"
    weights = "domain_model/diffusion_pytorch_model.safetensors"
    feat_max, _, _ = _max_diff(one / features, two / features)
    w_max, w_frac, n = _max_diff(one / weights, two / weights)
    print(f"2 nodes vs 1 process: text features max |diff| {feat_max:.2e}; domain UNet max "
          f"|diff| {w_max:.2e}, {w_frac:.1e} of {n} elements > 1e-6")  # fmt: skip
    # Float rounding only (the gradient is summed in another order). AdamW's first steps move
    # each weight by ~lr = 1e-3 whatever the gradient's size, so a gradient near 0 whose
    # rounding differs moves a weight by up to that: such weights are rare and stay < 10% of lr.
    assert feat_max < 1e-4
    assert w_max < 1e-4 and w_frac < 1e-3
    # ... while training moved the weights far more than that (else the test says nothing)
    from safetensors.torch import load_file

    from idgen.models import NullTextUNet, build_tiny_sd

    start = NullTextUNet.from_unet(build_tiny_sd(seed=0).unet, torch.zeros(1, 77, 32)).state_dict()
    trained = load_file(one / weights)
    moved = torch.cat(
        [(trained[k] - start[k]).abs().flatten() for k in trained if "domain_embedding" not in k]
    )
    assert moved.median() > 1e-3 > 10 * w_max

    # 2. Sampling with the exported model: same PNG bytes, image by image.
    model = f"domain_model={one / 'domain_model'}"
    single = run_python(
        ["-m", "idgen.sample", model, *SAMPLE, f"hydra.run.dir={one / 'sample'}"],
        tmp_path,
        root=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    run_two_nodes(
        ["-m", "idgen.sample", model, *SAMPLE, *TWO_NODES, f"hydra.run.dir={two / 'sample'}"],
        tmp_path,
    )
    files = sorted(p.name for p in (one / "sample" / "samples").glob("*.png"))
    assert len(files) == 6
    assert sorted(p.name for p in (two / "sample" / "samples").glob("*.png")) == files
    for name in files:
        a = (one / "sample" / "samples" / name).read_bytes()
        b = (two / "sample" / "samples" / name).read_bytes()
        assert a == b, f"{name} differs between 1 process and 2 nodes"


# ------------------------------------------------------------------------------ SLURM


def test_slurm_launcher_asks_for_the_trainers_nodes_and_gpus(tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` with trainer nodes x devices: the sbatch script submitit writes
    asks for 2 nodes x 8 tasks (one per GPU), and each task becomes its Lightning rank."""
    import stat

    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    overrides = ["hydra/launcher=slurm", "experiment=demo", "trainer=ddp", "trainer.devices=8"]
    cfg = compose_config("train", tmp_path, [*overrides, "trainer.num_nodes=2"])
    launcher = instantiate(cfg.hydra.launcher)
    # what hydra-submitit-launcher hands submitit (its launch(), without submitting)
    fake_srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor looks for srun on PATH
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 1\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}:{__import__('os').environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"submitit_folder", "max_num_timeout"}
    params = {
        k if k in base else f"slurm_{k}": v for k, v in launcher.params.items() if k not in skip
    }
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -m idgen.train", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert f"#SBATCH {line}\n" in script

    # Task 9 of 16 (node 1, local 1) as SLURM starts it: Lightning's SLURM environment makes it
    # global rank 9 of world 16 and starts no process itself.
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it to 9
    slurm = dict(
        SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", SLURM_PROCID="9", SLURM_LOCALID="1",
        SLURM_NODEID="1", SLURM_JOB_NAME="idgen", SLURM_JOB_ID="1234", SLURM_NODELIST="gpu[01-02]",
    )  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(
        accelerator="cpu", devices=8, num_nodes=2, strategy="ddp", logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    assert type(trainer.strategy.cluster_environment).__name__ == "SLURMEnvironment"
    assert (trainer.global_rank, trainer.world_size, trainer.node_rank) == (9, 16, 1)
    assert trainer.strategy.cluster_environment.creates_processes_externally
