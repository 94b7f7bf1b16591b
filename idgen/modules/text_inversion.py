"""Stage 1: text-feature inversion (paper §3.3, "Initializing E").

The text encoder's *output* features ``F^T`` for ``"a photo of <domain>"`` are the only
trainable tensor (with SDXL also the pooled embedding, and the UNet gets each training image's
``time_ids``: the base family says how, :mod:`idgen.models.family`); UNet, VAE and text
encoders stay frozen. The result seeds the null-text UNet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idgen.models.family import ModelFamily, family_of
from idgen.modules.base import DiffusionTrainingModule, OptimizerFactory, SchedulerFactory
from idgen.modules.sd_parts import TEXT_FEATURES_FILE, freeze, save_text_features


class TextFeatureInversionModule(DiffusionTrainingModule):
    """Optimise the text encoder's output features of a domain prompt with the denoising loss.

    SD1.5: ``text_features`` [1, 77, 768]. SDXL: ``text_features`` [1, 77, 2048] (both
    encoders) and ``pooled_features`` [1, 1280]; each image's ``time_ids`` come from the batch.
    At the end of fit, ``text_features.safetensors`` (features + prompt, base model, steps) is
    written to ``output_dir`` (default: the trainer's ``default_root_dir``).
    """

    frozen_names = ("vae", "unet")

    def __init__(
        self,
        model_loader: Callable[[], Any],
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        domain: str = "domain",
        prompt_template: str = "a photo of {domain}",
        frozen_dtype: str = "float32",
        **training: Any,
    ) -> None:
        # ``training``: DiffusionTrainingModule's keyword arguments (noise_offset, snr_gamma,
        # seed, base_model, output_dir); the export is always the text features file.
        super().__init__(
            model_loader,
            optimizer,
            lr_scheduler,
            **training,
            export_on_fit_end=True,
            export_dir_name=TEXT_FEATURES_FILE,
        )
        if "{domain}" not in prompt_template:
            raise ValueError(
                f"module.prompt_template={prompt_template!r} must contain '{{domain}}'."
            )
        self.save_hyperparameters(ignore=["model_loader", "optimizer", "lr_scheduler"])
        self.prompt = prompt_template.format(domain=domain)
        self.frozen_dtype = self.guard_frozen_dtype(frozen_dtype, "module.frozen_dtype")
        self.text_features: nn.Parameter | None = None
        self.pooled_features: nn.Parameter | None = None
        self.family: ModelFamily | None = None

    def setup(self, stage: str) -> None:
        if self.text_features is not None:
            return
        pipe = self.model_loader()
        self.family = family_of(pipe)
        dtype = self.resolve_frozen_dtype(self.frozen_dtype)  # memory.frozen_dtype=auto
        self.vae = freeze(pipe.vae.to(dtype))
        self.unet = freeze(self.family.denoiser(pipe).to(dtype))  # SD3: transformer
        self._setup_noise(pipe)
        self._attach_vae_to_data()
        # 1. The prompt's output features (and pooled embedding), encoded once by the frozen
        #    text encoder(s) in fp32; the encoders are not kept (memory).
        features, pooled = self.family.encode_prompt(pipe, [self.prompt])
        self.text_features = nn.Parameter(features.detach().float().clone())
        self.initial_features = features.detach().float().clone()
        if pooled is not None:
            self.pooled_features = nn.Parameter(pooled.detach().float().clone())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.text_features, self.pooled_features) if p is not None]

    def denoiser(self):
        """The frozen UNet conditioned on the learned features ``F^T`` (no added conditions)."""
        return self.denoiser_for({})

    def denoiser_for(self, batch: dict):
        """The frozen UNet conditioned on ``F^T`` (and, by the family, the pooled features and
        each image's ``time_ids`` from ``batch``)."""
        dtype = self.unet.dtype
        context = self.text_features.to(dtype)
        time_ids = self.family.batch_time_ids(batch)

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            rows = noisy.shape[0]
            pooled = None
            if self.pooled_features is not None:
                pooled = self.pooled_features.to(dtype).expand(rows, -1)
            ids = None if time_ids is None else time_ids.to(noisy.device, dtype)
            # the family's call convention (UNet: encoder_hidden_states + added conditions;
            # SD3's transformer: joint tokens + pooled projection)
            return self.family.predict(
                self.unet, noisy.to(dtype), t, context.expand(rows, -1, -1), pooled, ids
            )

        return predict

    def metadata(self) -> dict[str, object]:
        return super().metadata() | {"prediction_type": self.prediction_type}

    @property
    def features_path(self) -> Path | None:
        """``text_features.safetensors``, written at the end of fit."""
        return self.export_path

    def export(self, out: str | Path) -> Path:
        pooled = None if self.pooled_features is None else self.pooled_features.detach()
        meta = self.metadata() | {"family": self.family.name}
        return save_text_features(out, self.text_features.detach(), meta, pooled)
