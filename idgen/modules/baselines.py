"""Table 1 baselines (paper §4.4) as one LightningModule; the trainable part is chosen by config.

``method`` is one of :mod:`idgen.baselines.methods`: vanilla fine-tuning, LoRA, textual
inversion, Custom Diffusion, OFT. All share one training step: the denoising loss on domain
latents, conditioned on the template prompt ``"a photo of [V] <domain>"`` (``[V]`` omitted
when the method learns no token).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from idgen.baselines.export import export_baseline
from idgen.baselines.methods import BaselineMethod
from idgen.baselines.tokens import (
    add_placeholder_tokens,
    expand_placeholder,
    initial_vectors,
    splice_tokens,
    write_vectors,
)
from idgen.models.family import ModelFamily, family_of
from idgen.models.text import encode_text
from idgen.modules.base import DiffusionTrainingModule, OptimizerFactory, SchedulerFactory
from idgen.modules.sd_parts import freeze


def template_prompt(template: str, domain: str, token: str | None) -> str:
    """``"a photo of {token} {domain}"`` with the token, or with it (and its space) omitted."""
    prompt = template.format(domain=domain, token=token or "")
    return re.sub(r"\s+", " ", prompt).strip()


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)


class BaselineModule(DiffusionTrainingModule):
    """Train one Table 1 baseline on unlabeled domain images.

    At the end of fit the adaptation is exported to ``output_dir/export_dir_name`` in a form
    plain diffusers loads (see :func:`idgen.baselines.load_baseline_pipeline`). Checkpoints hold
    only the trained parameters (and the learned token vectors).
    """

    frozen_names = ("vae", "text_encoder", "text_encoder_2")

    def __init__(
        self,
        model_loader: Callable[[], Any],
        optimizer: OptimizerFactory,
        method: BaselineMethod,
        lr_scheduler: SchedulerFactory | None = None,
        domain: str = "domain",
        prompt_template: str = "a photo of {token} {domain}",
        frozen_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        text_features: str | None = None,
        **training: Any,
    ) -> None:
        # ``training``: DiffusionTrainingModule's keyword arguments (noise_offset, snr_gamma,
        # seed, base_model, output_dir, export_on_fit_end, export_dir_name).
        training.setdefault("export_dir_name", "baseline_model")
        super().__init__(model_loader, optimizer, lr_scheduler, **training)
        for key in ("{domain}", "{token}"):
            if key not in prompt_template:
                raise ValueError(
                    f"module.prompt_template={prompt_template!r} must contain '{key}' "
                    "(the token is dropped for methods that learn none)."
                )
        if not isinstance(method, BaselineMethod):
            raise TypeError(
                f"module.method must be an idgen.baselines.methods object, got {type(method)}"
            )
        # `text_features` is accepted (and unused) only because idgen-train's stage 2 passes
        # it to every module: baselines start from the SD text encoder.
        if text_features is not None:
            rank_zero_info(f"baseline {method.name}: ignoring text_features={text_features!r}")
        self.save_hyperparameters(
            ignore=["model_loader", "optimizer", "lr_scheduler", "method", "text_features"]
        )
        self.method = method
        self.domain = domain
        self.prompt_template = prompt_template
        self.frozen_dtype = self.guard_frozen_dtype(frozen_dtype, "module.frozen_dtype")
        self.gradient_checkpointing = gradient_checkpointing
        self.unet: nn.Module | None = None
        self.token_vectors: nn.Parameter | None = None
        self.first_token_id: int | None = None
        self.cached_context: torch.Tensor | None = None
        self.cached_pooled: torch.Tensor | None = None
        self.family: ModelFamily | None = None
        self._base = None  # the loaded pipeline (its parts are this module's; for pipeline())
        self.num_trainable_params = 0
        self._scheduler = None

    # --- setup ------------------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        """The training prompt as a user writes it (``[V]`` as the single placeholder token)."""
        return template_prompt(self.prompt_template, self.domain, self.method.token)

    def setup(self, stage: str) -> None:
        if self.unet is not None:
            return
        pipe = self.model_loader()
        # The family says what the base needs (SDXL: a second text encoder, pooled features,
        # each image's time_ids) and whether idgen implements this method on it.
        self.family = family_of(pipe)
        self.family.require(self.method.feature, "module.method", self.method.name)
        self._base = pipe
        self.vae = freeze(pipe.vae.to(self.frozen_dtype))
        self.text_encoder = freeze(pipe.text_encoder)
        if getattr(pipe, "text_encoder_2", None) is not None:
            self.text_encoder_2 = freeze(pipe.text_encoder_2)
        self.tokenizer = pipe.tokenizer
        self._scheduler = pipe.scheduler
        self._setup_noise(pipe)

        # 1. The denoiser (``self.unet``: SD's UNet, SD3's transformer): frozen, then the
        # method makes its part trainable (fp32 for training).
        unet = freeze(self.family.denoiser(pipe)).float()
        self.method.prepare(unet)
        if self.method.trains_unet:
            unet.train()
            if self.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
        self.unet = unet

        # 2. The placeholder token [V], if learned: new rows spliced in by a hook.
        if self.method.token is not None:
            n = self.method.num_vectors
            self.first_token_id = add_placeholder_tokens(
                self.tokenizer, self.text_encoder, self.method.token, n
            )
            init = initial_vectors(
                self.tokenizer, self.text_encoder, self.method.initializer or self.domain, n
            )
            self.token_vectors = nn.Parameter(init)
            splice_tokens(self.text_encoder, self.token_vectors, self.first_token_id)
        else:
            # 3. No learned token: the prompt's features never change, encode them once.
            with torch.no_grad():
                context, pooled = self.family.encode_prompt(pipe, [self.prompt])
            self.cached_context = context.float()
            self.cached_pooled = None if pooled is None else pooled.float()
        self.num_trainable_params = count_parameters(self.trainable_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.token_vectors is not None:
            params.append(self.token_vectors)
        return params

    def train(self, mode: bool = True):
        super().train(mode)
        if self.unet is not None and not self.method.trains_unet:
            self.unet.eval()
        return self

    def on_fit_start(self) -> None:
        super().on_fit_start()
        rank_zero_info(
            f"baseline {self.method.name}: {self.num_trainable_params:,} trainable parameters "
            f"(prompt: {self.prompt!r})"
        )
        for logger in self.loggers:
            logger.log_hyperparams({"trainable_params": self.num_trainable_params})

    # --- training ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text features [1, T, D] (gradients reach the learned token vectors only)."""
        if self.method.token is not None:
            prompt = expand_placeholder(prompt, self.method.token, self.method.num_vectors)
        # one text encoder with gradients (the family's encode_prompt runs without them): the
        # methods that learn a token need the family feature "baseline_tokens" (SD1.5 only)
        return encode_text(self.tokenizer, self.text_encoder, [prompt]).float()

    def context(self) -> torch.Tensor:
        if self.cached_context is not None:
            return self.cached_context.to(self.device)
        return self.encode_prompt(self.prompt)

    def denoiser(self):
        """The adapted UNet conditioned on the method's training prompt."""
        return self.denoiser_for({})

    def denoiser_for(self, batch: dict):
        """The adapted UNet conditioned on the training prompt (and, as the family asks, its
        pooled features and each image's ``time_ids`` from ``batch``)."""
        context = self.context()
        pooled = self.cached_pooled
        time_ids = self.family.batch_time_ids(batch)

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            rows = noisy.shape[0]
            cond = context.expand(rows, -1, -1)
            vector = None if pooled is None else pooled.to(noisy.device).expand(rows, -1)
            ids = None if time_ids is None else time_ids.to(noisy.device, noisy.dtype)
            return self.family.predict(self.unet, noisy, t, cond, vector, ids)

        return predict

    # --- sampling and export ----------------------------------------------------------------
    def pipeline(self) -> Any:
        """The family's diffusers pipeline (``StableDiffusionPipeline``,
        ``StableDiffusionXLPipeline``) over the module's own (trained) components, for sampling."""
        if self.token_vectors is not None:
            write_vectors(self.text_encoder, self.token_vectors.detach(), self.first_token_id)
        return self.family.txt2img.from_pipe(self._base, **{self.family.denoiser_name: self.unet})

    def metadata(self) -> dict[str, object]:
        return super().metadata() | {
            "domain": self.domain,
            "trainable_params": self.num_trainable_params,
        }

    def export(self, out_dir: str | Path) -> Path:
        vectors = self.token_vectors.detach() if self.token_vectors is not None else None
        meta = self.metadata() | {"family": self.family.name}
        return export_baseline(
            out_dir, self.method, self.unet, vectors, meta, pipeline_class=self.family.txt2img
        )

    # --- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # only what is trained: e.g. LoRA's matrices, not the frozen UNet they sit on
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("unet.") and k not in trained]:
            del state[key]
        checkpoint["idgen_metadata"] = self.metadata() | {"method": self.method.name}
