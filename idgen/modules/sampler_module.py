"""Predict-time sampling with InDomainPipeline: prompts x images as a dataset, one step per batch.

Run through ``Trainer.predict`` so N devices split the work; ``SampleWriter`` writes the images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from idgen.callbacks.guidance_trace import GuidanceTrace, TracedInDomainPipeline
from idgen.callbacks.log_media import log_series, log_table
from idgen.guidance import GuidanceTerm


@dataclass
class SamplerSettings:
    """Everything that decides an image besides its prompt and seed (``conf/sampler/*.yaml``).

    Paths (``controlnet``, ``control_image``, ``image``, each ``extra_guidance[i].model``) are
    strings, opened only when sampling starts. ``extra_guidance`` entries are dicts with the
    fields of :class:`GuidanceTerm` (``name``, ``model``: a UNet folder or null for the frozen SD,
    ``prompt``, ``weight``, ``start``, ``end``).
    """

    name: str = "decoupled"
    w_d: float | None = None
    w_c: float | None = None
    w0: float = 7.0
    weights: str = "auto"
    # Active part of the schedule for each term, as [start, end] fractions (beyond the paper):
    # outside it the term drops out of the mix.
    domain_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    control_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    num_inference_steps: int = 100
    scheduler: str = "dpm++"
    negative_prompt: str | None = None
    controlnet: str | list[str] | None = None
    control_image: str | list[str] | None = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    controlnet_on_uncond: bool = False
    image: str | None = None
    strength: float = 0.8
    extra_guidance: list[dict[str, Any]] = field(default_factory=list)
    # How an exported Table-1 baseline (idgen-sample baseline_model=<folder>) is used:
    # "pipeline": its UNet/text encoder/tokenizer replace SD's (standard CFG with sampler=cfg);
    # "rectify": the frozen SD stays, the baseline's UNet fills extra_guidance[0] (paper §4.5).
    baseline_mode: str = "pipeline"
    required: list[str] = field(default_factory=list)  # dotted fields that must be set

    def check_required(self, provided: Sequence[str] = ()) -> None:
        """Fail early, naming the override, when a field this sampler needs is unset.

        ``provided``: required fields filled from elsewhere (e.g. by ``baseline_model``).
        """
        for dotted in self.required:
            if dotted in provided:
                continue
            value: Any = self
            for part in dotted.split("."):
                if isinstance(value, list | tuple):
                    value = value[int(part)] if int(part) < len(value) else None
                elif isinstance(value, dict):
                    value = value.get(part)
                else:
                    value = getattr(value, part, None)
            if value in (None, "", []):
                raise ValueError(
                    f"sampler '{self.name}' needs sampler.{dotted}; set it on the command line, "
                    f"e.g. sampler.{dotted}=<path>."
                )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """Prompts from a list and/or a text file (one per line; blank lines and ``#`` lines skipped)."""
    out = [str(p) for p in (prompts or [])]
    if prompt_file:
        path = Path(os.path.expanduser(prompt_file))
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt_file '{path}' does not exist; give a text file with one prompt per line "
                "or set prompt_file=null and pass prompts=[...]."
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise ValueError("no prompts: set prompts=[...] or prompt_file=<file>")
    return out


def image_seed(seed: int, index: int) -> int:
    """Seed of the image with global index ``index``: the same whatever devices or order."""
    return int(seed) + int(index)


class PromptGrid(Dataset):
    """Global index ``g = prompt_index * images_per_prompt + k`` -> prompt, seed, done flag."""

    def __init__(
        self,
        prompts: Sequence[str],
        images_per_prompt: int,
        seed: int,
        is_done: Callable[[int], bool] | None = None,
    ):
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        self.prompts = list(prompts)
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.is_done = is_done

    def __len__(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def __getitem__(self, index: int) -> dict[str, Any]:
        p, k = divmod(index, self.images_per_prompt)
        # Checked when the item is fetched, not when the dataset is built, so a rerun skips
        # what any rank finished, and every rank still sees the same index list.
        done = bool(self.is_done(index)) if self.is_done is not None else False
        return {
            "index": index,
            "prompt_index": p,
            "image_index": k,
            "prompt": self.prompts[p],
            "seed": image_seed(self.seed, index),
            "done": done,
        }


def collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def params_hash(params: dict[str, Any]) -> str:
    """Short hash of the settings that decide the images (stored in each PNG, checked on rerun)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


BASELINE_MODES = ("pipeline", "rectify")


class SamplerModule(L.LightningModule):
    """Builds an ``InDomainPipeline`` in ``setup`` and samples one padded batch per predict step.

    Batches are padded to ``batch_size`` rows so each image is computed in a batch of the same
    size wherever it lands (device, resume): CPU kernels then give bit-identical images.
    """

    def __init__(
        self,
        sd_loader: Callable[[], Any],
        settings: SamplerSettings,
        domain_model: str | None = None,
        batch_size: int = 4,
        resolution: int | None = None,
        dtype: str | None = None,
        cpu_offload: bool = False,
        baseline_model: str | None = None,
    ):
        super().__init__()
        if settings.baseline_mode not in BASELINE_MODES:
            raise ValueError(
                f"sampler.baseline_mode={settings.baseline_mode!r}: use one of {BASELINE_MODES}."
            )
        self.sd_loader = sd_loader
        self.settings = settings
        self.domain_model = domain_model
        self.baseline_model = baseline_model
        self.batch_size = batch_size
        self.resolution = resolution
        self.dtype_name = dtype
        self.cpu_offload = cpu_offload
        self.pipe: TracedInDomainPipeline | None = None
        self.trace = GuidanceTrace()  # per-step norms and weights, logged at the end
        self.models = nn.ModuleDict()
        self._control_images: Any = None
        self._init_image: Any = None
        self._extra: list[GuidanceTerm | None] = []  # None: the baseline's term, built per call
        self._baseline: Any = None  # the baseline pipeline in "rectify" mode
        self._baseline_term: dict[str, Any] = {}
        self._prompt_pipe: Any = None  # converts multi-vector [V] tokens in "pipeline" mode

    # ----------------------------------------------------------------------------- loading

    def setup(self, stage: str) -> None:
        if self.pipe is not None:
            return
        from diffusers import ControlNetModel, UNet2DConditionModel

        from idgen.models import NullTextUNet

        s = self.settings
        rectify = bool(self.baseline_model) and s.baseline_mode == "rectify"
        s.check_required(provided=["extra_guidance.0.model"] if rectify else [])
        sd = self.sd_loader()
        base = sd
        if self.baseline_model:
            from idgen.baselines import load_baseline_pipeline

            baseline = load_baseline_pipeline(_existing(self.baseline_model, "baseline_model"), sd)
            baseline.unet.requires_grad_(False).eval()
            if rectify:
                self._baseline = baseline  # SD stays the base: its uncond rectifies the baseline
            else:
                base = self._prompt_pipe = baseline  # standard CFG with the baseline's parts
        domain = None
        if self.domain_model:
            domain = NullTextUNet.from_pretrained(_existing(self.domain_model, "domain_model"))
        controlnet = None
        if s.controlnet:
            paths = s.controlnet if isinstance(s.controlnet, list | tuple) else [s.controlnet]
            nets = [
                ControlNetModel.from_pretrained(_existing(p, "sampler.controlnet")) for p in paths
            ]
            controlnet = nets[0] if len(nets) == 1 else nets
        self.pipe = TracedInDomainPipeline.from_sd(
            base, domain_unet=domain, controlnet=controlnet, scheduler=s.scheduler
        )
        self._control_images = _load_images(s.control_image, "sampler.control_image")
        self._init_image = _load_images(s.image, "sampler.image")
        if rectify:
            self._baseline_term = _baseline_term_spec(s.extra_guidance)
        for i, spec in enumerate(s.extra_guidance):
            spec = dict(spec)
            if rectify and i == 0:
                self._extra.append(None)
                continue
            model = spec.pop("model", None)
            if model is not None:
                path = _existing(model, f"sampler.extra_guidance[{i}].model")
                sub = "unet" if (path / "unet").is_dir() else None
                model = UNet2DConditionModel.from_pretrained(path, subfolder=sub)
                model.requires_grad_(False).eval()
                if (path / "text_encoder").is_dir():
                    # A community pipeline folder may ship a fine-tuned text encoder: use it.
                    from transformers import CLIPTextModel

                    encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
                    spec["text_encoder"] = encoder.requires_grad_(False).eval()
            self._extra.append(GuidanceTerm(model=model, **spec))
        for module in self.pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        if not self.cpu_offload:
            # Registered as children so Lightning moves them to this rank's device.
            for name, module in self.pipe.components.items():
                if isinstance(module, nn.Module):
                    self.models[name] = module
            if self._baseline is not None:
                self.models["baseline_unet"] = self._baseline.unet
                self.models["baseline_text_encoder"] = self._baseline.text_encoder
            for i, term in enumerate(self._extra):
                if term is None:
                    continue
                if isinstance(term.model, nn.Module):
                    self.models[f"extra_{i}"] = term.model
                if isinstance(term.text_encoder, nn.Module):
                    self.models[f"extra_{i}_text_encoder"] = term.text_encoder

    def on_predict_start(self) -> None:
        dtype = _parse_dtype(self.dtype_name)
        if dtype is not None and self.device.type != "cpu":
            # Frozen models in half precision on accelerators (memory: SD + domain + ControlNet).
            self.pipe.to(dtype=dtype)
            for module in self._extra_modules():
                module.to(dtype=dtype)
        if self.cpu_offload and self.device.type != "cpu":
            self.pipe.enable_model_cpu_offload(device=self.device)
            for module in self._extra_modules():  # not pipeline components: kept on the device
                module.to(self.device)

    def _extra_modules(self) -> list[nn.Module]:
        """Models outside the pipeline's components: extra terms and the rectified baseline."""
        modules = [
            m
            for term in self._extra
            if term is not None
            for m in (term.model, term.text_encoder)
            if isinstance(m, nn.Module)
        ]
        if self._baseline is not None:
            modules += [self._baseline.unet, self._baseline.text_encoder]
        return modules

    def _guidance_terms(self, prompts: list[str]) -> list[GuidanceTerm]:
        """The extra terms of one call; the baseline's (rectify mode) gets these prompts' features."""
        if self._baseline is None:
            return [t for t in self._extra if t is not None]
        from idgen.baselines.sampling import baseline_prompt_embeds

        spec = dict(self._baseline_term)
        own = spec.pop("prompt", None)
        # The baseline's own encoder and tokenizer ([V] tokens), as diffusers would encode them.
        texts = prompts if own is None else [own]
        embeds = torch.cat([baseline_prompt_embeds(self._baseline, p) for p in texts])
        term = GuidanceTerm(model=self._baseline.unet, prompt_embeds=embeds, **spec)
        return [term if t is None else t for t in self._extra]

    # ----------------------------------------------------------------------------- sampling

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        pending = [item for item in batch if not item["done"]]
        if not pending:
            return []
        # 1. Pad to a full batch with copies of the last item (outputs dropped below).
        padded = pending + [pending[-1]] * (self.batch_size - len(pending))
        # 2. One generator per image, seeded from its global index, on the CPU.
        generators = [torch.Generator().manual_seed(item["seed"]) for item in padded]
        s = self.settings
        size = self.resolution
        prompts = [item["prompt"] for item in padded]
        negative = None if s.negative_prompt is None else [s.negative_prompt] * len(padded)
        if self._prompt_pipe is not None:
            # diffusers expands a multi-vector "<v>" into "<v> <v>_1 ..." before tokenizing.
            convert = self._prompt_pipe.maybe_convert_prompt
            prompts = convert(prompts, self._prompt_pipe.tokenizer)
            negative = None if negative is None else convert(negative, self._prompt_pipe.tokenizer)
        out = self.pipe(
            prompt=prompts,
            negative_prompt=negative,
            w_d=s.w_d,
            w_c=s.w_c,
            w0=s.w0,
            weights=s.weights,
            domain_interval=tuple(s.domain_interval),
            control_interval=tuple(s.control_interval),
            num_inference_steps=s.num_inference_steps,
            height=size,
            width=size,
            generator=generators,
            control_image=self._control_images,
            controlnet_conditioning_scale=s.controlnet_conditioning_scale,
            controlnet_on_uncond=s.controlnet_on_uncond,
            image=self._init_image,
            strength=s.strength,
            extra_guidance=self._guidance_terms([item["prompt"] for item in padded]),
            output_type="pil",
        )
        self.trace.add(self.pipe.steps, out.guidance_weights, rows=len(pending))
        # 3. Per image: the PIL image and the weights it was sampled with.
        results = []
        for row, item in enumerate(pending):
            weights = {k: round(float(v[row]), 6) for k, v in out.guidance_weights.items()}
            results.append({**item, "image": out.images[row], "guidance_weights": weights})
        return results

    def on_predict_end(self) -> None:
        # Per-step means over this rank's images (rank 0 logs: loggers are rank-zero only).
        if self.loggers and self.trace.counts and self.trainer.is_global_zero:
            log_series(self.loggers, self.trace.series())
            log_table(self.loggers, "guidance/trace", *self.trace.table())


def _baseline_term_spec(extra_guidance: list[dict[str, Any]]) -> dict[str, Any]:
    """``extra_guidance[0]`` (weight, interval, prompt) as the rectified baseline's term."""
    if not extra_guidance:
        raise ValueError(
            "sampler.baseline_mode=rectify takes the baseline term's weight from "
            "sampler.extra_guidance.0; use sampler=rectify or add an extra_guidance entry."
        )
    spec = dict(extra_guidance[0])
    if spec.pop("model", None) is not None:
        raise ValueError(
            "baseline_model fills sampler.extra_guidance.0.model in rectify mode; give one of "
            "the two (set sampler.extra_guidance.0.model=null)."
        )
    spec["name"] = "baseline"
    return spec


def _existing(path: str, field_name: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{field_name}='{p}' does not exist; check the path.")
    return p


def _load_images(paths: str | list[str] | None, field_name: str):
    if paths is None:
        return None
    from PIL import Image

    many = isinstance(paths, list | tuple)
    images = [
        Image.open(_existing(p, field_name)).convert("RGB") for p in (paths if many else [paths])
    ]
    return images if many else images[0]


def _parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "null", "float32", "fp32"):
        return None
    table = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"dtype={name!r} is not supported; use float16, bfloat16 or null.")
    return table[name]
