"""GPU-gated tests (``-m gpu``; skipped without CUDA): half-precision sampling, AMP training, DDP.

``benchmarks/device_check.py`` runs these on the GPU machine. ``IDGEN_GPU_TEST_DEVICE=cpu``
runs the same code on the CPU (a dry run of the tests themselves, for when no GPU is at hand;
precisions the CPU lacks are skipped there).
"""

from __future__ import annotations

import copy
import os
import textwrap

import lightning as L
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from idgen.models import NullTextUNet, build_tiny_sd
from idgen.pipelines import InDomainPipeline
from idgen.toyworld.demo import DemoDomainDataModule
from tests.conftest import quiet_trainer, run_python, tiny_finetune_module

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("IDGEN_GPU_TEST_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_sampling_stays_as_close_to_fp32_as_diffusers_cfg(dtype):
    """Ours in fp16/bf16 vs ours in fp32, against the same drift of diffusers' own CFG pipeline."""
    sd = build_tiny_sd(seed=0, device=DEVICE)
    ids = sd.tokenizer(["a photo of a red circle"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        features = sd.text_encoder(ids.input_ids.to(DEVICE))[0]
    domain = NullTextUNet.from_unet(sd.unet, features)
    scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    cfg = StableDiffusionPipeline(**{**sd.components, "scheduler": scheduler})
    cfg.set_progress_bar_config(disable=True)
    ours = InDomainPipeline.from_sd(sd, domain_unet=domain, scheduler=copy.deepcopy(scheduler))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    kw = dict(num_inference_steps=10, output_type="latent")
    prompts = ["a photo of a red circle", "a photo of a blue square"]

    def run(precision: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        z = noise.to(precision)
        a = ours(prompts, w_d=3.5, w_c=3.5, latents=z, **kw).images
        b = cfg(prompts, guidance_scale=7.5, latents=z, **kw).images
        return a.float(), b.float()

    ours32, cfg32 = run(torch.float32)
    sd.to(dtype=dtype)
    domain.to(dtype=dtype)
    ours_half, cfg_half = run(dtype)
    assert torch.isfinite(ours_half).all() and torch.isfinite(cfg_half).all()
    err, ref_err = _rel_err(ours_half, ours32), _rel_err(cfg_half, cfg32)
    # Rounding drift is of diffusers' own size (bf16 rounds 8x coarser than fp16): a dtype
    # bug (an fp32 tensor mixed in, weights combined in the wrong precision) is far above it.
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    assert err < (0.05 if dtype == torch.float16 else 0.3), err
    with torch.no_grad():  # the decoded images are finite in half precision too
        image = sd.vae.decode(ours_half.to(dtype) / sd.vae.config.scaling_factor).sample
    assert torch.isfinite(image).all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_amp_null_text_finetuning_steps_are_finite(tmp_path, precision):
    if DEVICE == "cpu" and precision == "16-mixed":
        pytest.skip("16-mixed needs CUDA")
    L.seed_everything(0)
    module = tiny_finetune_module(tmp_path / "run")
    trainer = quiet_trainer(
        tmp_path / "run",
        4,
        accelerator=ACCELERATOR,
        precision=precision,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = DemoDomainDataModule(root=str(tmp_path / "demo"), num_images=16, batch_size=4)
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {k: v.detach().clone() for k, v in pl_module.domain_unet.state_dict().items()}

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = module.domain_unet.state_dict()
    # Mixed precision: trained weights stay float32, finite, and moved.
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from idgen.toyworld.demo import DemoDomainDataModule
    from tests.conftest import quiet_trainer, tiny_finetune_module

    out, accelerator = Path(sys.argv[1]), sys.argv[2]
    L.seed_everything(0)
    module = tiny_finetune_module(out / "run")
    backend = "nccl" if accelerator == "gpu" else "gloo"
    trainer = quiet_trainer(
        out / "run", 3, accelerator=accelerator, precision="bf16-mixed",
        strategy=DDPStrategy(process_group_backend=backend, find_unused_parameters=False),
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=DemoDomainDataModule(root=str(out / "demo"), num_images=16,
                                                        batch_size=4))
    finite = all(torch.isfinite(p).all().item() for p in module.domain_unet.parameters())
    torch.save({"step": trainer.global_step, "world": trainer.world_size, "finite": finite,
                "strategy": type(trainer.strategy).__name__}, out / "result.pt")
    """
)


def test_ddp_on_one_gpu_trains_without_unused_parameters(tmp_path):
    """DDP (find_unused_parameters=False, NCCL) on one device: the null-text UNet has no
    parameter without a gradient, so DDP's reducer does not fail."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = run_python([str(script), str(tmp_path), ACCELERATOR], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result == {"step": 3, "world": 1, "finite": True, "strategy": "DDPStrategy"}
