"""Guidance-decoupled sampling as a Lightning callback (paper §3.2, §3.4).

At predict time::

    trainer.predict(domain_module, datamodule=PromptsDataModule(prompts, images_per_prompt=4),
                    callbacks=[DecoupledGuidanceSampling(sd=build_tiny_sd, out_dir="samples")])

``domain_module`` provides the domain model as ``domain_unet`` (``NullTextFinetuneModule`` from a
checkpoint, or :class:`~idgen.sampling.DomainModel` for an exported ``domain_model/``) and passes
the plan items through its ``predict_step``; the callback holds the frozen SD, ControlNets and
guidance settings, samples each batch and writes the images resumably. During fine-tuning the
same callback draws validation grids with decoupled guidance on real prompts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers.image_processor import VaeImageProcessor
from lightning.pytorch.callbacks import Callback
from torch import nn

from idgen.guidance import GuidanceTerm
from idgen.models.family import family_of
from idgen.pipelines import InDomainPipeline, decoupled_pipeline_class
from idgen.sampling.components import SamplingComponents, load_components
from idgen.sampling.plan import SamplingPlan, params_hash
from idgen.sampling.settings import BASELINE_MODES, SamplerSettings
from idgen.sampling.trace import GuidanceTrace
from idgen.sampling.writer import SampleWriter, grid_caption
from idgen.utils.dtypes import parse_dtype
from idgen.utils.images import make_grid
from idgen.utils.io import save_image_atomic
from idgen.utils.log_media import log_images, log_series, log_table
from idgen.utils.validation import assert_finite_images

log = logging.getLogger(__name__)


class DecoupledGuidanceSampling(Callback):
    """Samples ``eps_sd(z,"") + sum_i w_i (eps_i - eps_sd(z,""))`` for the plan items of each
    predict batch (and validation grids during fit) with the module's ``domain_unet``.

    Args:
        sd: the frozen SD (a ``StableDiffusionPipeline``) or a callable that loads it (lazily).
        terms: the guidance terms (``GuidanceTerm``; the domain model is ``model="domain_unet"``,
            see :func:`idgen.guidance.decoupled_terms`); default: from ``settings``.
        settings: scheduler, steps, ControlNet, SDEdit image, ... (``idgen/conf/sampler/*.yaml``);
            default ``SamplerSettings()`` (decoupled, automatic weights, DPM-Solver++ 100 steps).
        out_dir: where images go (default: the trainer's ``default_root_dir``).
        batch_size: rows per pipeline call; each batch is padded to it so an image is computed
            in a batch of the same size wherever it lands (bit-identical on 1 or N devices,
            and on resume). Default: the predict dataloader's batch size.
        resolution: pixels (default: the model's native size).
        dtype: frozen models on accelerators in ``float16`` / ``bfloat16`` (predict only).
        cpu_offload: diffusers' model CPU offload (GPU only, predict only).
        baseline_model: an exported Table-1 baseline (``settings.baseline_mode``).
        model_ids: which weights made the images, recorded in every PNG.
        every_n_train_steps, val_prompts, val_images_per_prompt, val_seed: validation grids
            during ``fit`` every ``every_n_train_steps`` steps and at its end (off when
            ``every_n_train_steps`` is None or no prompts are given).
    """

    def __init__(
        self,
        sd: Callable[[], Any] | Any,
        terms: Sequence[GuidanceTerm] | None = None,
        settings: SamplerSettings | None = None,
        out_dir: str | Path | None = None,
        batch_size: int | None = None,
        resolution: int | None = None,
        dtype: str | None = None,
        cpu_offload: bool = False,
        baseline_model: str | None = None,
        model_ids: dict[str, Any] | None = None,
        images_subdir: str = "samples",
        grids: bool = True,
        every_n_train_steps: int | None = None,
        val_prompts: Sequence[str] = (),
        val_images_per_prompt: int = 2,
        val_seed: int = 0,
    ):
        super().__init__()
        if settings is not None and settings.baseline_mode not in BASELINE_MODES:
            raise ValueError(
                f"sampler.baseline_mode={settings.baseline_mode!r}: use one of {BASELINE_MODES}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or None, got {every_n_train_steps}")
        self.sd = sd
        self.terms = None if terms is None else list(terms)
        self.settings = settings or SamplerSettings()
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.batch_size = batch_size
        self.resolution = resolution
        self.dtype = dtype
        self.cpu_offload = cpu_offload
        self.baseline_model = baseline_model
        self.model_ids = dict(model_ids or {})
        self.images_subdir = images_subdir
        self.grids = grids
        self.every_n_train_steps = every_n_train_steps
        self.val_plan = (
            SamplingPlan(tuple(val_prompts), val_images_per_prompt, val_seed)
            if val_prompts
            else None
        )
        self.pipe: InDomainPipeline | None = None
        self.writer: SampleWriter | None = None
        self.trace: GuidanceTrace | None = None
        self._parts: SamplingComponents | None = None
        self._pad_to = 1
        self._last_val_step = -1

    # ----------------------------------------------------------------------------- sampling

    def params(self, plan: SamplingPlan) -> tuple[dict[str, Any], str]:
        """What decides the images (recorded in every PNG) and its hash (checked on rerun)."""
        params: dict[str, Any] = {
            "sampler": self.settings.to_dict(),
            "model_ids": self.model_ids,
            "resolution": self.resolution,
            "base_seed": int(plan.seed),
        }
        if self.terms is not None:
            params["terms"] = [t.describe() for t in self.terms]
        digest = params_hash(params)
        params["batch_size"] = self._pad_to  # recorded, not hashed (see batch_size above)
        return params, digest

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs before the module's setup: a training module that can lend its frozen SD parts
        # keeps them for the grids, so the process holds one copy of SD, not two.
        if stage == "fit" and self.every_n_train_steps and self.val_plan is not None:
            if hasattr(pl_module, "keep_sampling_parts"):
                pl_module.keep_sampling_parts = True

    def build_pipeline(self, pl_module: L.LightningModule, predict: bool) -> InDomainPipeline:
        """The pipeline around the module's current ``domain_unet`` (built once, on its device).

        The frozen SD is the training module's own (``sampling_pipeline()``) during fit when it
        has one, else ``sd`` (loaded here)."""
        if self._parts is None:
            lent = None if predict else getattr(pl_module, "sampling_pipeline", lambda: None)()
            sd = lent if lent is not None else self.sd
            self._parts = load_components(sd, self.settings, self.baseline_model)
        parts = self._parts
        domain = getattr(pl_module, "domain_unet", None)
        if self.pipe is None:
            # the base's family picks the sampler (InDomainPipeline, InDomainXLPipeline, ...)
            self.pipe = decoupled_pipeline_class(family_of(parts.base)).from_sd(
                parts.base,
                domain_unet=domain,
                controlnet=parts.controlnet,
                scheduler=self.settings.scheduler,
            )
        frozen = [
            m
            for k, m in self.pipe.components.items()
            if isinstance(m, nn.Module) and k != "domain_unet"
        ] + parts.modules()
        for module in frozen:
            module.requires_grad_(False).eval()
        device = pl_module.device
        dtype = parse_dtype(self.dtype, "dtype") if self.dtype else None
        on_accelerator = device.type != "cpu"
        if predict and self.cpu_offload and on_accelerator:
            if dtype is not None:
                self.pipe.to(dtype=dtype)
            self.pipe.enable_model_cpu_offload(device=device)
        else:
            for module in frozen:
                module.to(device)
            if predict and dtype is not None and on_accelerator:
                # Frozen models in half precision on accelerators (SD + domain + ControlNet).
                self.pipe.to(dtype=dtype)
        for module in parts.modules():  # not pipeline components: kept on the device
            module.to(device=device, dtype=dtype if predict and on_accelerator else None)
        return self.pipe

    def sample(self, items: list[dict[str, Any]], pad_to: int) -> list[dict[str, Any]]:
        """Images for plan ``items`` in one pipeline call padded to ``pad_to`` rows."""
        parts = self._parts
        # 1. Pad with copies of the last item (outputs dropped); one CPU generator per image.
        padded = items + [items[-1]] * (pad_to - len(items))
        generators = [torch.Generator().manual_seed(int(it["seed"])) for it in padded]
        raw = [it["prompt"] for it in padded]
        # 2. Settings -> pipeline arguments (one place: SamplerSettings.pipeline_kwargs).
        terms = (
            self.terms
            if self.terms is not None
            else self.settings.guidance_terms(parts.extra_terms(raw))
        )
        kwargs = self.settings.pipeline_kwargs(terms, parts.control_image, parts.image)
        if kwargs["negative_prompt"] is not None:
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * pad_to
        # Multi-vector "<v>" tokens are expanded by the pipeline's encode_prompt (diffusers').
        out = self.pipe(
            prompt=raw,
            generator=generators,
            height=self.resolution,
            width=self.resolution,
            output_type="np",
            callback_on_step_end=self.trace,
            **kwargs,
        )
        real = out.images[: len(items)]
        # The one finiteness check of sampled images: on the float pixels and weights, before
        # they become PNGs (a PIL image cannot hold NaN; it would be written as black).
        assert_finite_images(
            {
                **it,
                "pixels": real[row],
                "guidance_weights": {k: v[row] for k, v in out.guidance_weights.items()},
            }
            for row, it in enumerate(items)
        )
        images = VaeImageProcessor.numpy_to_pil(real)  # what output_type="pil" gives
        if self.trace is not None:
            self.trace.end_call(len(items), out.guidance_weights)
        # 3. Per image: the PIL image and the weights it was sampled with.
        return [
            {
                **item,
                "image": images[row],
                "guidance_weights": {
                    k: round(float(v[row]), 6) for k, v in out.guidance_weights.items()
                },
            }
            for row, item in enumerate(items)
        ]

    # ----------------------------------------------------------------------------- predict

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan = _find_plan(trainer)
        self._pad_to = self.batch_size or _loader_batch_size(trainer)
        params, digest = self.params(plan)
        out_dir = self.out_dir or Path(trainer.default_root_dir)
        self.writer = SampleWriter(out_dir, plan, params, digest, self.images_subdir, self.grids)
        if trainer.is_global_zero:
            self.writer.prepare()
        trainer.strategy.barrier()
        self.trace = GuidanceTrace() if trainer.loggers else None
        self.build_pipeline(pl_module, predict=True)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: list[dict[str, Any]],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Checked now, not when the plan was built: a rerun skips what any rank finished.
        pending = [item for item in batch if not self.writer.is_done(item["index"])]
        if not pending:
            return
        for item in self.sample(pending, max(self._pad_to, len(pending))):
            self.writer.write(item)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank has written its share; rank 0 then builds the index and grids from the PNGs.
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.writer.finalize(loggers=trainer.loggers)
            # Per-step means over this rank's images (loggers are rank-zero only).
            if self.trace is not None and self.trace.counts:
                log_series(trainer.loggers, self.trace.series())
                log_table(trainer.loggers, "guidance/trace", *self.trace.table())
        trainer.strategy.barrier()

    # ----------------------------------------------------------------------------- fit

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        n = self.every_n_train_steps
        if not n or self.val_plan is None or step == self._last_val_step or step % n:
            return
        self._last_val_step = step
        self.validation_grids(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run shorter than ``every_n_train_steps`` (or ending between two grids) still ends
        with one validation grid, of the final weights."""
        step = trainer.global_step
        if (
            not self.every_n_train_steps
            or self.val_plan is None
            or step in (0, self._last_val_step)
        ):
            return
        self._last_val_step = step
        self.validation_grids(trainer, pl_module, step)

    def validation_grids(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> list[Path]:
        """Sample the validation prompts with decoupled guidance on every rank (same seeds, so
        no rank waits alone); rank 0 saves one captioned grid per prompt and logs them."""
        domain = getattr(pl_module, "domain_unet", None)
        if domain is None:
            return []  # e.g. stage 1 (text-feature inversion): nothing to guide with yet
        plan = self.val_plan
        self.build_pipeline(pl_module, predict=False)
        # The weights that would be exported (EMA when the module keeps one), in eval mode.
        swapped = getattr(pl_module, "export_weights_context", nullcontext)
        was_training = domain.training
        domain.eval()
        try:
            with swapped():
                items = self.sample([plan.item(i) for i in range(len(plan))], len(plan))
        finally:
            domain.train(was_training)
            self._release_device(pl_module)
        if not trainer.is_global_zero:
            return []
        out_dir = (self.out_dir or Path(trainer.default_root_dir)) / "validation"
        sampler = self.settings.to_dict()
        paths, grids, captions = [], [], []
        for p, prompt in enumerate(plan.prompts):
            mine = [it for it in items if it["prompt_index"] == p]
            caption = grid_caption(prompt, [{**it, "sampler": sampler} for it in mine])
            grid = make_grid(
                [it["image"] for it in mine],
                title=f"step {step}: {caption}",
                labels=[f"seed {it['seed']}" for it in mine],
            )
            path = out_dir / f"step_{step:07d}_p{p:04d}.png"
            weights = [it["guidance_weights"] for it in mine]
            text = {"caption": caption, "step": str(step), "seed": str(plan.seed)}
            save_image_atomic(grid, path, text | {"weights": json.dumps(weights)})
            paths.append(path)
            grids.append(grid)
            captions.append(caption)
        log_images(trainer.loggers, "validation/decoupled_grid", grids, captions, step=step)
        return paths

    def _release_device(self, pl_module: L.LightningModule) -> None:
        """After a grid on an accelerator: the frozen base UNet and text encoder(s) go back to
        host memory (training needs the device memory); the VAE stays, training uses it."""
        if pl_module.device.type == "cpu" or self.pipe is None:
            return
        for name, module in self.pipe.components.items():
            if isinstance(module, nn.Module) and name not in ("domain_unet", "vae"):
                module.to("cpu")
        for module in self._parts.modules():
            module.to("cpu")


def _find_plan(trainer: L.Trainer) -> SamplingPlan:
    """The plan of the predict data: ``datamodule.plan`` or the dataloader's ``dataset.plan``."""
    plan = getattr(trainer.datamodule, "plan", None)
    if plan is None:
        plan = getattr(getattr(_first_predict_loader(trainer), "dataset", None), "plan", None)
    if not isinstance(plan, SamplingPlan):
        raise ValueError(
            "DecoupledGuidanceSampling needs prompts x seeds as predict data: pass "
            "datamodule=PromptsDataModule(prompts, ...) (or a DataLoader over PromptGrid)."
        )
    return plan


def _loader_batch_size(trainer: L.Trainer) -> int:
    size = getattr(trainer.datamodule, "batch_size", None)
    if size is None:
        size = getattr(_first_predict_loader(trainer), "batch_size", None)
    return int(size or 1)


def _first_predict_loader(trainer: L.Trainer):
    """The (first) predict DataLoader the trainer was given."""
    loaders = trainer.predict_dataloaders
    return loaders[0] if isinstance(loaders, list | tuple) else loaders
