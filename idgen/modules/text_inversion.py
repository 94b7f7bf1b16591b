"""Stage 1: text-feature inversion (paper §3.3, "Initializing E").

The text encoder's *output* features ``F^T`` for ``"a photo of <domain>"`` are the only
trainable tensor; UNet, VAE and text encoder stay frozen. The result seeds the null-text UNet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idgen.modules.base import DiffusionTrainingModule, OptimizerFactory, SchedulerFactory
from idgen.modules.sd_parts import (
    TEXT_FEATURES_FILE,
    encode_prompt,
    freeze,
    save_text_features,
)


class TextFeatureInversionModule(DiffusionTrainingModule):
    """Optimise the text encoder's output features of a domain prompt with the denoising loss.

    At the end of fit, ``text_features.safetensors`` (features + prompt, base model, steps) is
    written to ``output_dir`` (default: the trainer's ``default_root_dir``).
    """

    frozen_names = ("vae", "text_encoder", "unet")

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

    def setup(self, stage: str) -> None:
        if self.text_features is not None:
            return
        pipe = self.model_loader()
        self.vae = freeze(pipe.vae.to(self.frozen_dtype))
        self.text_encoder = freeze(pipe.text_encoder)
        self.unet = freeze(pipe.unet.to(self.frozen_dtype))
        self._setup_noise(pipe)
        self._attach_vae_to_data()
        # 1. The prompt's output features, encoded once by the frozen text encoder (fp32).
        features = encode_prompt(pipe.tokenizer, self.text_encoder, self.prompt)
        self.text_features = nn.Parameter(features.detach().clone())
        self.initial_features = features.detach().clone()
        # the text encoder is not needed after this; drop it to save memory
        self.text_encoder = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.text_features]

    def denoiser(self):
        """The frozen UNet conditioned on the learned features ``F^T``."""
        context = self.text_features.to(self.unet.dtype)

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cond = context.expand(noisy.shape[0], -1, -1)
            return self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=cond).sample

        return predict

    def metadata(self) -> dict[str, object]:
        return super().metadata() | {"prediction_type": self.prediction_type}

    @property
    def features_path(self) -> Path | None:
        """``text_features.safetensors``, written at the end of fit."""
        return self.export_path

    def export(self, out: str | Path) -> Path:
        return save_text_features(out, self.text_features.detach(), self.metadata())
