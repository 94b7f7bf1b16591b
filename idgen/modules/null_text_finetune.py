"""Stage 2: fine-tune the whole null-text domain UNet on domain images (paper §3.3)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idgen.models.family import ModelFamily, family_of
from idgen.models.null_text_unet import NullTextUNet
from idgen.modules.base import DiffusionTrainingModule, OptimizerFactory, SchedulerFactory
from idgen.modules.ema import EMA
from idgen.modules.export import export_domain_model, unet_from_checkpoint
from idgen.modules.sd_parts import freeze, load_pooled_features, load_text_features


class NullTextFinetuneModule(DiffusionTrainingModule):
    """Fine-tune a :class:`NullTextUNet` built in ``setup()`` from the SD UNet and ``F^T``.

    ``text_features``: a stage-1 ``text_features.safetensors`` (or a folder holding one); when
    ``None`` the prompt is encoded afresh. ``init="calibrated"`` computes ``E`` from the first
    ``calibration_batches`` training batches. EMA is the ``EMAWeights`` callback
    (``callbacks.ema``): it averages :meth:`ema_target` and sets :attr:`ema`, whose weights
    validation grids (the ``DecoupledGuidanceSampling`` callback, through
    :meth:`export_weights_context`) and export then use; without it they use the raw weights.
    Only the null-text UNet, EMA, optimizer/scheduler state and RNG states are checkpointed.

    Memory: ``F^T`` is fixed, so the text encoder encodes the prompt (when there is no stage-1
    file) and is dropped; the base UNet is dropped once copied. When the validation-grid
    callback asks for them (:attr:`keep_sampling_parts`, set in its ``setup``), the base pipeline
    is kept instead, frozen in ``vae_dtype``, outside the module (Lightning does not move it to
    the device), and :meth:`sampling_pipeline` hands it (its VAE is the module's) to the
    callback, which moves them on and off the device around each grid: one copy of SD in the
    process, not two.
    """

    frozen_names = ("vae",)

    def __init__(
        self,
        model_loader: Callable[[], Any],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        text_features: str | None = None,
        domain: str = "domain",
        prompt_template: str = "a photo of {domain}",
        init: str = "value",
        calibration_batches: int = 4,
        train_embeddings: bool = True,
        gradient_checkpointing: bool = False,
        vae_dtype: str | None = None,
        **training: Any,
    ) -> None:
        # ``training``: DiffusionTrainingModule's keyword arguments (noise_offset, snr_gamma,
        # seed, base_model, output_dir, export_on_fit_end, export_dir_name).
        training.setdefault("export_dir_name", "domain_model")
        super().__init__(model_loader, optimizer, lr_scheduler, **training)
        if init not in ("value", "calibrated"):
            raise ValueError(f"module.init={init!r}: use 'value' or 'calibrated'.")
        # frozen parts' dtype: vae_dtype, else memory.frozen_dtype (conf/memory)
        self.vae_dtype = self.guard_frozen_dtype(
            vae_dtype or self.memory.frozen_dtype, "module.vae_dtype"
        )
        self.save_hyperparameters(ignore=["model_loader", "optimizer", "lr_scheduler"])
        self.text_features_path = text_features
        self.prompt = prompt_template.format(domain=domain)
        self.init = init
        self.calibration_batches = calibration_batches
        self.train_embeddings = train_embeddings
        self.gradient_checkpointing = gradient_checkpointing
        #: set by the validation-grid callback before setup: keep the frozen base UNet and
        #: text encoder for :meth:`sampling_pipeline` instead of dropping them
        self.keep_sampling_parts = False
        self._sampling_pipe: Any = None
        self.domain_unet: NullTextUNet | None = None
        self.text_features: torch.Tensor | None = None
        self.family: ModelFamily | None = None
        self._calibration_time_ids: torch.Tensor | None = None
        #: set by the ``EMAWeights`` callback at fit start (``None``: no EMA, raw weights)
        self.ema: EMA | None = None

    # --- setup ------------------------------------------------------------------------------
    def _calibration_latents(self) -> torch.Tensor:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            raise ValueError(
                "module.init='calibrated' needs the training images: fit with a datamodule, "
                "or use module.init='value'."
            )
        latents, time_ids = [], []
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= self.calibration_batches:
                break
            latents.append(self.latents_from_batch(batch))
            time_ids.append(self.family.batch_time_ids(batch))  # None for SD1.5
        self._calibration_time_ids = None if time_ids[0] is None else torch.cat(time_ids)
        return torch.cat(latents)

    def setup(self, stage: str) -> None:
        if self.domain_unet is not None:
            return
        pipe = self.model_loader()
        self.family = family_of(pipe)
        dtype = self.resolve_frozen_dtype(self.vae_dtype)  # memory.frozen_dtype
        self.vae = freeze(pipe.vae.to(dtype))
        self._setup_noise(pipe)
        self._attach_vae_to_data()

        # 1. F^T (and the pooled features of families with them): the stage-1 result, or the
        #    prompt's encoding when there is none.
        if self.text_features_path is not None:
            features = load_text_features(self.text_features_path)
            pooled = load_pooled_features(self.text_features_path)
        else:
            features, pooled = self.family.encode_prompt(pipe, [self.prompt])
        self.text_features = features.float().cpu()

        # 2. The null-text UNet, copied from the SD UNet (which is dropped afterwards).
        calibration = self._calibration_latents() if self.init == "calibrated" else None
        calibration_conditions = {}  # SDXL: each calibration image's size conditioning
        if self._calibration_time_ids is not None:
            calibration_conditions["calibration_time_ids"] = self._calibration_time_ids
        generator = torch.Generator().manual_seed(self.seed)
        self.domain_unet = self.family.null_text_model(
            self.family.denoiser(pipe),
            features,
            init=self.init,
            calibration_latents=calibration,
            generator=generator,
            pooled_features=None if pooled is None else pooled.float(),
            **calibration_conditions,
        ).float()
        self.domain_unet.set_embeddings_trainable(self.train_embeddings)
        if self.gradient_checkpointing:
            self.domain_unet.enable_gradient_checkpointing()
        if self.memory.compile:
            self.domain_unet.compile()
        self.domain_unet.train()

        # 3. What validation grids sample with, kept only when asked (a pipeline is not a
        #    submodule: not moved to the device with the module, not checkpointed).
        if self.keep_sampling_parts:
            for name, part in pipe.components.items():
                if isinstance(part, nn.Module) and name != "vae":  # the VAE is self.vae
                    freeze(part.to(dtype))
            self._sampling_pipe = pipe
        del pipe  # otherwise the text encoder(s) and the base UNet are freed here

    def sampling_pipeline(self) -> Any:
        """The frozen base pipeline (its VAE is the module's) for validation grids, or ``None``
        when it was not kept (``keep_sampling_parts`` was not set)."""
        return self._sampling_pipe

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.domain_unet.parameters() if p.requires_grad]

    # --- EMA --------------------------------------------------------------------------------
    def ema_target(self) -> NullTextUNet | None:
        """What the ``EMAWeights`` callback averages: the null-text UNet (built in setup)."""
        return self.domain_unet

    def export_weights_context(self):
        """Context manager with the EMA weights swapped in (or a no-op without EMA)."""
        from contextlib import nullcontext

        return self.ema.swapped_in(self.domain_unet) if self.ema is not None else nullcontext()

    # --- training ---------------------------------------------------------------------------
    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, time_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.domain_unet(sample, timestep, time_ids=time_ids).sample

    def denoiser(self):
        return self.forward

    def denoiser_for(self, batch: dict):
        """The domain UNet with each image's ``time_ids`` from ``batch`` (SDXL; SD1.5: none)."""
        time_ids = self.family.batch_time_ids(batch)
        if time_ids is None:
            return self.forward
        return lambda sample, timestep: self.forward(sample, timestep, time_ids)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Passes prompt-plan items through: ``DecoupledGuidanceSampling`` samples at predict time."""
        return batch

    # --- export -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, object]:
        return super().metadata() | {
            "init": self.init,
            "prediction_type": self.prediction_type,
            "text_features_source": str(self.text_features_path or "encoded prompt"),
        }

    def export(self, out_dir: str | Path, use_ema: bool = True) -> Path:
        meta = self.metadata() | {"weights": "ema" if use_ema and self.ema else "raw"}
        if use_ema:
            with self.export_weights_context():
                return export_domain_model(self.domain_unet, out_dir, self.text_features, meta)
        return export_domain_model(self.domain_unet, out_dir, self.text_features, meta)

    def export_state(self, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
        """The domain model from a gathered ``state_dict()`` (``trainer=fsdp``; raw weights,
        as there is no EMA under a sharded strategy)."""
        checkpoint = {"null_text_unet_config": self._unet_config(), "state_dict": state}
        unet = unet_from_checkpoint(checkpoint, use_ema=False).float()
        meta = self.metadata() | {"weights": "raw"}
        return export_domain_model(unet, out_dir, self.text_features, meta)

    # --- checkpoints ------------------------------------------------------------------------
    def _unet_config(self) -> dict[str, Any]:
        # the domain model's class and constructor arguments (NullTextUNet: unet_config, init;
        # the SD3 null-text transformer: transformer_config, context_length, init)
        model = self.domain_unet
        return {"_class_name": type(model).__name__} | model.extract_init_dict(dict(model.config))[
            0
        ]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["null_text_unet_config"] = self._unet_config()
        checkpoint["text_features"] = self.text_features

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("text_features") is not None:
            self.text_features = checkpoint["text_features"]
