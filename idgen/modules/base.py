"""Shared plumbing of idgen's diffusion training modules.

Frozen Stable Diffusion parts are loaded lazily in ``setup()`` from a loader partial, kept in
eval mode, and never written to checkpoints; VAE sampling noise, noise and timesteps come from
one CPU generator, the same on every rank (each keeps its rows of the global batch, so a run on
N processes trains as one process at the same global batch), whose state is checkpointed with
the global RNG states, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from idgen.data.latents import latents_from_batch as data_latents
from idgen.memory.optim import build_optimizer, fused_backward_optimizer
from idgen.memory.settings import MemorySettings, frozen_dtype
from idgen.modules.diffusion_loss import denoising_loss
from idgen.modules.flow_matching import flow_matching_loss, flow_matching_options, flow_sigmas
from idgen.utils.dtypes import parse_dtype
from idgen.utils.validation import NonFiniteLossError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def capture_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def gathered_state_dict(strategy: Any) -> dict[str, torch.Tensor] | None:
    """The module's whole ``state_dict`` on rank 0 (empty on the others) under a strategy that
    shards the weights (FSDP, DeepSpeed ZeRO-3); ``None`` where every rank holds them whole.

    A collective under those strategies: every rank must call it.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            return strategy.model.state_dict()
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        # DeepSpeed's own gather, in the run's 16-bit precision; keys under Lightning's wrapper
        state = strategy.model._zero3_consolidated_16bit_state_dict() or {}
        return {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return None


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((states["python_version"], tuple(states["python"]), states["python_gauss"]))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class DiffusionTrainingModule(L.LightningModule):
    """Base class of the training modules (stage 1, stage 2, the Table 1 baselines).

    It owns what they share: frozen-part bookkeeping, the denoising loss (``training_step`` /
    ``validation_step`` over the subclass's :meth:`denoiser`), the non-finite guard, the
    output folder, the precision guard of frozen parts, the metadata, checkpoint filtering and
    RNG state, and the export at the end of fit (:meth:`export` on rank 0, then a barrier so
    no rank reads a half-written result).

    Args (every subclass takes them as keywords, ``idgen/conf/module/*.yaml`` sets them):
        model_loader: returns the SD pipeline whose parts are trained or frozen (lazily, in
            ``setup``).
        optimizer, lr_scheduler: partial constructors (``_partial_: true``) of the optimizer
            and scheduler over :meth:`trainable_parameters`.
        noise_offset: diffusers' offset noise (0: off); snr_gamma: min-SNR weighting (None: off)
            of the denoising objective (SD1.5, SDXL).
        flow_matching: timestep sampling and loss weighting of the flow-matching objective
            (SD3; :func:`~idgen.modules.flow_matching.flow_matching_options`, None: SD3's).
        seed: seeds the per-rank noise generator (``seed + 1000 * rank``).
        base_model: the base's name, recorded in the export's metadata.
        output_dir, export_on_fit_end, export_dir_name: where and whether :meth:`export` writes
            at the end of fit (``<output_dir>/<export_dir_name>``).
    """

    #: the family's training objective, set by ``_setup_noise``
    objective: str = "denoising"

    #: attribute names of frozen submodules (never trained, never checkpointed)
    frozen_names: tuple[str, ...] = ()
    #: a NaN/inf loss or gradient: "stop" raises ``NonFiniteLossError`` before the weights are
    #: touched (the last checkpoint stays the newest); "skip" drops that update and counts it in
    #: ``train/nonfinite_skipped``. idgen-train sets it from ``nonfinite_loss``.
    nonfinite_loss: str = "stop"

    def __init__(
        self,
        model_loader: Callable[[], Any],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        *,
        noise_offset: float = 0.0,
        snr_gamma: float | None = None,
        flow_matching: dict | None = None,
        seed: int = 0,
        base_model: str = "unknown",
        output_dir: str | None = None,
        export_on_fit_end: bool = True,
        export_dir_name: str = "export",
        memory: MemorySettings | dict | None = None,
    ) -> None:
        super().__init__()
        self.memory = MemorySettings.from_config(memory)
        self.model_loader = model_loader
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.noise_offset = noise_offset
        self.snr_gamma = snr_gamma
        self.flow_matching = flow_matching_options(flow_matching)
        self.seed = seed
        self.base_model = base_model
        self.noise_generator: torch.Generator | None = None
        self.prediction_type = "epsilon"
        self.scheduler_config: dict = {}
        # frozen weights are not in checkpoints, so loading must tolerate their absence
        self.strict_loading = False
        self.nonfinite_skipped = 0
        self.output_dir = output_dir
        self.export_on_fit_end = export_on_fit_end
        self.export_dir_name = export_dir_name
        self.export_path: Path | None = None

    @staticmethod
    def guard_frozen_dtype(name: str | torch.dtype, field: str) -> torch.dtype | str:
        """The dtype of frozen parts that include the SD VAE: float16 is refused (its decoder
        overflows to NaN in half precision; diffusers upcasts it for the same reason).
        ``"auto"`` stays as it is until :meth:`resolve_frozen_dtype` knows the run."""
        if name == "auto":
            return name
        dtype = parse_dtype(name, field)
        if dtype == torch.float16:
            raise ValueError(
                f"{field}=float16 makes the SD VAE produce NaNs; use float32 or bfloat16."
            )
        return dtype

    def resolve_frozen_dtype(self, dtype: torch.dtype | str) -> torch.dtype:
        """``"auto"``: bfloat16 on an accelerator in a ``bf16-*`` run, float32 otherwise."""
        if dtype != "auto":
            return dtype
        if self._trainer is None:
            return torch.float32
        precision = str(self.trainer.precision)
        return frozen_dtype("auto", precision, self.trainer.strategy.root_device.type)

    # --- output -----------------------------------------------------------------------------
    def resolve_output_dir(self) -> Path:
        """``output_dir``, or the trainer's ``default_root_dir``."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(self.trainer.default_root_dir)

    def metadata(self) -> dict[str, object]:
        """What the result records about how it was made (subclasses add their own keys)."""
        return {
            "prompt": self.prompt,
            "base_model": self.base_model,
            "steps": int(self.global_step) if self._trainer is not None else 0,
            **getattr(self, "base_traits", {}),  # e.g. SD3: whether T5 was there
        }

    def export(self, out: str | Path) -> Path:
        """Write the trained result to ``out`` (a file or folder); called on rank 0."""
        raise NotImplementedError

    def on_fit_end(self) -> None:
        if not self.export_on_fit_end:
            return
        self.export_path = self.resolve_output_dir() / self.export_dir_name
        state = gathered_state_dict(self.trainer.strategy)  # every rank takes part
        if state is None:  # every rank holds the whole weights
            self._export_rank_zero()
        elif self.trainer.is_global_zero:
            self.export_state(state, self.export_path)
            rank_zero_info(f"{type(self).__name__}: exported to {self.export_path}")
        # other ranks (and the next stage on them) read what rank 0 has just written
        self.trainer.strategy.barrier("exported")

    def export_state(self, state: dict[str, torch.Tensor], out: str | Path) -> Path:
        """:meth:`export` from this module's whole ``state_dict()``, gathered on rank 0 under a
        strategy that shards the weights (``trainer=fsdp``), where no rank holds them all."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot export under a sharded strategy (trainer=fsdp or "
            "DeepSpeed stage 3); train it with trainer=ddp."
        )

    @rank_zero_only
    def _export_rank_zero(self) -> None:
        self.export(self.export_path)
        rank_zero_info(f"{type(self).__name__}: exported to {self.export_path}")

    # --- setup helpers ----------------------------------------------------------------------
    def _setup_noise(self, pipe: Any) -> None:
        self.scheduler_config = dict(pipe.scheduler.config)
        family = getattr(self, "family", None)
        self.base_traits = family.base_traits(pipe) if family is not None else {}
        # the family's training objective: "denoising" (eps / v) or "flow_matching" (SD3)
        self.objective = family.training_objective if family is not None else "denoising"
        flow = self.objective == "flow_matching"
        self._check_objective_options(family, flow)
        if flow:
            # SD3: sigmas from the flow-matching scheduler's own table; no DDPM table (a
            # DDPMScheduler built from this config would only warn about its `shift`).
            self.flow_sigmas = flow_sigmas(self.scheduler_config)
            self.prediction_type = "flow_matching"  # the velocity noise - x0 (metadata)
        else:
            noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
            self.flow_sigmas = None
            self.prediction_type = noise_scheduler.config.prediction_type
            self.register_buffer(
                "alphas_cumprod", noise_scheduler.alphas_cumprod.float().clone(), persistent=False
            )
        # The same stream on every rank: each draws for the global batch and keeps its rows
        # (``data_shard``), so results do not depend on how many processes share a batch.
        self.noise_generator = torch.Generator().manual_seed(self.seed)

    def _check_objective_options(self, family: Any, flow: bool) -> None:
        """Options of the other objective are an error, never ignored (idgen-train's preflight
        names the config key first): min-SNR weighting needs the DDPM noise schedule."""
        name = getattr(family, "name", "sd15")
        if flow and self.snr_gamma is not None:
            raise ValueError(
                f"snr_gamma={self.snr_gamma} (min-SNR weighting) does not apply to model family "
                f"{name}, trained by flow matching; drop it and set flow_matching.loss_weighting "
                "(sigma_sqrt, cosmap) or its timestep sampling instead."
            )
        if not flow and self.flow_matching:
            raise ValueError(
                f"flow_matching={self.flow_matching} applies to flow-matching bases (sd3) only, "
                f"not to model family {name} (trained by denoising); drop it."
            )

    def _attach_vae_to_data(self) -> None:
        """Let a data module with ``cache_latents`` encode its images once with our VAE."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "attach_vae"):
            datamodule.attach_vae(self.vae, model_id=self.base_model)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_names:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    # --- loss -------------------------------------------------------------------------------
    def data_shard(self) -> tuple[int, int]:
        """``(rank, world)``: this process holds rows ``rank, rank + world, ...`` of each global
        batch (``idgen.data.datamodule.EpochSeededSampler``, Lightning's ``DistributedSampler``)."""
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def latents_from_batch(self, batch: dict) -> torch.Tensor:
        """Scaled latents from ``pixel_values`` or the data module's cached ``latent_params``
        (the VAE's sampling noise from ``noise_generator``, drawn for the global batch)."""
        with torch.no_grad():
            return data_latents(batch, self.vae, self.noise_generator, self.data_shard()).float()

    def loss_for(
        self, predict, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The denoising loss of ``predict`` on ``latents`` (noise from ``noise_generator``)."""
        if self.objective == "flow_matching":  # the family's objective (_setup_noise)
            return flow_matching_loss(
                predict,
                latents,
                self.flow_sigmas,
                generator=generator or self.noise_generator,
                noise_offset=self.noise_offset,
                shard=self.data_shard(),
                **self.flow_matching,
            )
        return denoising_loss(
            predict,
            latents,
            self.alphas_cumprod,
            self.prediction_type,
            generator=generator or self.noise_generator,
            noise_offset=self.noise_offset,
            snr_gamma=self.snr_gamma,
            shard=self.data_shard(),
        )

    def denoiser(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``predict(noisy_latents, timesteps) -> model output`` of the model being trained."""
        raise NotImplementedError

    def denoiser_for(self, batch: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """:meth:`denoiser` for one batch: a module whose base family needs per-image added
        conditions (SDXL's ``time_ids``) reads them from ``batch`` here."""
        return self.denoiser()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents = self.latents_from_batch(batch)
        loss = self.loss_for(self.denoiser_for(batch), latents)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=latents.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """``val/loss``: the denoising loss on the held-out images (``data.val_fraction``).

        VAE sample, noise and timesteps come from a generator seeded by the batch index, so
        every validation sees the same noisy latents and ``val/loss`` moves only with the
        weights. The training streams are not touched (``noise_generator``, the global RNG; the
        validation loader has its own generator): holding images out changes no training step.
        Runs every ``trainer.val_check_interval`` steps (default: at the end of each epoch).
        """
        generator = torch.Generator().manual_seed(self.seed + batch_idx)
        latents = data_latents(batch, self.vae, generator, self.data_shard()).float()
        loss = self.loss_for(self.denoiser_for(batch), latents, generator)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=latents.shape[0])
        return loss

    # --- optimisation -----------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """``memory.optimizer`` over ``params`` (``config``: ``module.optimizer`` as written);
        with ``memory.fused_backward`` stepped per parameter inside the backward pass."""
        if self.memory.fused_backward:
            return fused_backward_optimizer(
                self.memory.optimizer, params, self.optimizer_factory, self._fused_grad_check
            )
        return build_optimizer(self.memory.optimizer, params, self.optimizer_factory)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=self.memory.set_to_none)

    def _fused_grad_check(self, param: torch.nn.Parameter) -> bool:
        """The non-finite guard of the fused backward pass, per parameter: each parameter is
        updated as soon as its gradient exists, so a NaN/inf found here may follow updates of
        parameters whose gradients came earlier in the same backward pass."""
        if bool(torch.isfinite(param.grad).all()):
            return True
        if self.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                self._nonfinite_message("A gradient")
                + " (memory.fused_backward: parameters whose gradients came earlier in this "
                "backward pass were already updated.)"
            )
        self.nonfinite_skipped += 1
        return False

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- non-finite guard -------------------------------------------------------------------
    def _nonfinite_message(self, what: str) -> str:
        from idgen.modules.checkpoint_io import newest_complete_checkpoint

        newest = None
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        if callback is not None and getattr(callback, "dirpath", None):
            newest = newest_complete_checkpoint(callback.dirpath)
        kept = (
            f"The last good checkpoint is {newest[0]} (step {newest[1]}); resume from it with "
            "ckpt_path=last and the same hydra.run.dir"
            if newest
            else "No checkpoint was written yet"
        )
        return (
            f"{what} is NaN/inf at global step {self.global_step} (epoch {self.current_epoch}); "
            f"training stopped before the update and nothing after it was saved. {kept}. Lower "
            "the learning rate, check the data, or pass nonfinite_loss=skip to skip such steps."
        )

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if self.nonfinite_loss == "stop" and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(self._nonfinite_message(f"The training loss ({loss.item()})"))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Total L2 norm of the gradients about to be applied (before any clipping): a
        # dashboard series next to train/loss and the learning rate.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        if not norms:
            return
        total = torch.stack(norms).norm()
        finite = bool(torch.isfinite(total))
        if not finite and self.nonfinite_loss == "stop":
            raise NonFiniteLossError(self._nonfinite_message("The gradient norm"))
        if not finite:  # skip: optimizers leave parameters without a gradient untouched
            for p in params:
                p.grad = None
            self.nonfinite_skipped += 1
        if self.nonfinite_loss == "skip":  # the running count of skipped steps
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True)
        if finite:
            self.log("train/grad_norm", total, on_step=True, on_epoch=False)

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = tuple(f"{n}." for n in self.frozen_names)
        state = checkpoint["state_dict"]
        keys = [k for k in state if k.startswith(frozen)]
        # A sharded checkpoint (FSDP's DTensor shards) keeps them: its loader reads every key
        # the module has.
        if all(type(state[k]) is torch.Tensor for k in keys):
            for key in keys:
                del state[key]
        # Plain containers only: Hydra hands nested config blocks (flow_matching, memory) over
        # as omegaconf objects, which torch.load(weights_only=True) refuses to unpickle.
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict):
            for key, value in hparams.items():
                if isinstance(value, DictConfig | ListConfig):
                    hparams[key] = OmegaConf.to_container(value, resolve=True)
        checkpoint["rng_states"] = capture_rng_states()
        checkpoint["idgen_metadata"] = self.metadata()
        if self.noise_generator is not None:
            checkpoint["noise_generator"] = self.noise_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
        if "noise_generator" in checkpoint and self.noise_generator is not None:
            # every rank runs the same stream (see _setup_noise): rank 0's is everyone's
            self.noise_generator.set_state(checkpoint["noise_generator"])
