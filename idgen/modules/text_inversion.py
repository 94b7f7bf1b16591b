"""Stage 1: text-feature inversion (paper §3.3, "Initializing E").

The text encoder's *output* features ``F^T`` for ``"a photo of <domain>"`` are the only
trainable tensor; UNet, VAE and text encoder stay frozen. The result seeds the null-text UNet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn

from idgen.modules.base import DiffusionTrainingModule, OptimizerFactory, SchedulerFactory
from idgen.modules.sd_parts import (
    TEXT_FEATURES_FILE,
    encode_prompt,
    freeze,
    save_text_features,
)
from idgen.utils.dtypes import parse_dtype


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
        output_dir: str | None = None,
        frozen_dtype: str = "float32",
        noise_offset: float = 0.0,
        snr_gamma: float | None = None,
        seed: int = 0,
        base_model: str = "unknown",
    ) -> None:
        super().__init__(
            model_loader, optimizer, lr_scheduler, noise_offset, snr_gamma, seed, base_model
        )
        if "{domain}" not in prompt_template:
            raise ValueError(
                f"module.prompt_template={prompt_template!r} must contain '{{domain}}'."
            )
        self.save_hyperparameters(ignore=["model_loader", "optimizer", "lr_scheduler"])
        self.prompt = prompt_template.format(domain=domain)
        self.output_dir = output_dir
        self.frozen_dtype = parse_dtype(frozen_dtype, "module.frozen_dtype")
        if self.frozen_dtype == torch.float16:
            raise ValueError(
                "module.frozen_dtype=float16 makes the SD VAE produce NaNs; use float32 or bfloat16."
            )
        self.text_features: nn.Parameter | None = None
        self.features_path: Path | None = None

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
        return {
            "prompt": self.prompt,
            "base_model": self.base_model,
            "steps": int(self.global_step),
            "prediction_type": self.prediction_type,
        }

    def resolve_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(self.trainer.default_root_dir)

    def on_fit_end(self) -> None:
        self.features_path = self.resolve_output_dir() / TEXT_FEATURES_FILE
        self._write_features()
        # stage 2 on other ranks reads the file rank 0 has just written
        self.trainer.strategy.barrier("text_features_written")

    @rank_zero_only
    def _write_features(self) -> None:
        save_text_features(self.features_path, self.text_features.detach(), self.metadata())
        rank_zero_info(f"text features written to {self.features_path}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["idgen_metadata"] = self.metadata()
