"""Model families: what differs between SD1.5 and SDXL bases, in one object each.

The rest of idgen asks the family (``family_of(pipe)``) how to encode prompts, what the
unconditional branch is, what added conditions a UNet needs per image, which diffusers
pipelines are the reference and how a folder is recognised; it never tests for a family by
name. A new family is one more :class:`ModelFamily` in :data:`FAMILIES` (SD3 was the second:
:class:`SD3Family`, a transformer denoiser trained by flow matching).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn

from idgen.models.layouts import SD3_CONTEXT_LENGTH
from idgen.models.null_text_transformer import NullTextSD3Transformer
from idgen.models.null_text_unet import NullTextUNet, removed_prefixes, transformer_blocks
from idgen.models.text import encode_text
from idgen.models.tiny import build_tiny_sd
from idgen.models.tiny_sd3 import build_tiny_sd3
from idgen.models.tiny_sdxl import build_tiny_sdxl
from idgen.utils.validation import UserInputError


class FamilyError(UserInputError, ValueError):
    """A model (folder, pipeline, UNet) is not of the family the config asks for."""


@dataclass(frozen=True)
class ModelFamily:
    """What one base family needs; the defaults are SD1.5's (one CLIP, no added conditions)."""

    name: str
    #: ``model_index.json`` ``_class_name`` values of this family's folders
    class_names: tuple[str, ...]
    #: components a folder needs (checked before loading)
    components: tuple[str, ...]
    txt2img: type
    img2img: type
    controlnet_pipeline: type
    controlnet_class: type
    default_resolution: int
    build_tiny: Callable[..., Any]
    #: the UNet's ``addition_embed_type`` (None: text reaches it through cross-attention only)
    addition_embed_type: str | None = None
    #: keyword arguments ``txt2img.from_pretrained`` needs beside the weights
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    #: the pipeline attribute holding the denoiser (``unet``; SD3: ``transformer``)
    denoiser_name: str = "unet"
    #: how the denoiser is trained: ``"denoising"`` (DDPM noise, the scheduler's
    #: ``prediction_type``) or ``"flow_matching"`` (velocity ``noise - x0``, SD3)
    training_objective: str = "denoising"
    #: what idgen implements on this family beyond training and decoupled sampling
    #: (``"baseline_finetune"``: vanilla fine-tuning of the denoiser, ``"baselines"``: the other
    #: Table-1 baselines that adapt the UNet (LoRA, OFT), ``"baseline_tokens"``: those learning a
    #: placeholder token, ``"baseline_sampling"``: ``baseline_model=`` at sampling,
    #: ``"baseline_rectify"``: its rectified mode, ``"controlnet"``, ``"sds"``: idgen-3d)
    features: frozenset[str] = frozenset()
    #: the denoiser's diffusers class (built from its ``config.json``)
    denoiser_class: type = UNet2DConditionModel

    def require(self, feature: str, key: str, value: Any) -> None:
        """Raise :class:`FamilyError` (one line, naming ``key=value``) when idgen does not
        implement ``feature`` for this family yet."""
        if feature not in self.features:
            have = ", ".join(n for n, f in FAMILIES.items() if feature in f.features)
            raise FamilyError(
                f"{key}={value!r} needs {FEATURE_NAMES.get(feature, feature)}, which idgen "
                f"implements for {have or 'no'} bases only, not yet for {self.name}; use a base "
                "of that family (model=...)."
            )

    # --- the denoiser ------------------------------------------------------------------------
    def denoiser(self, pipe: Any) -> Any:
        """The pipeline's denoiser (its UNet, or SD3's transformer)."""
        return getattr(pipe, self.denoiser_name)

    def predict(
        self,
        model: Any,
        noisy: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One text-conditioned forward of the family's denoiser (``context`` [B, T, D])."""
        return model(
            noisy,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs=self.added_cond_kwargs(pooled, time_ids),
        ).sample

    def null_text_model(
        self,
        denoiser: Any,
        text_features: torch.Tensor,
        pooled_features: torch.Tensor | None = None,
        **init: Any,
    ) -> Any:
        """The text-free domain model copied from ``denoiser`` and ``F^T`` (paper Eq. 5):
        :class:`NullTextUNet` (``init``: its ``init``, ``calibration_latents``, ``generator``)."""
        return NullTextUNet.from_unet(
            denoiser, text_features, pooled_features=pooled_features, **init
        )

    def load_kwargs_for(self, folder: str | os.PathLike) -> dict[str, Any]:
        """``txt2img.from_pretrained`` keyword arguments for this folder (beside the weights)."""
        return dict(self.load_kwargs)

    def base_traits(self, pipe: Any) -> dict[str, Any]:
        """What a trained result records about its base beyond its name (SD3: whether T5 was
        there), so that sampling can refuse a base that lacks it."""
        return {}

    # --- the memory plan (idgen.memory.sizes builds these on meta / fake tensors) -------------
    def denoiser_from_config(self, config: dict[str, Any]) -> nn.Module:
        """The denoiser built from its ``config.json`` on the active device (or fake mode)."""
        return self.denoiser_class(**{k: v for k, v in dict(config).items() if k[0] != "_"})

    def domain_shapes(self, denoiser: nn.Module) -> list[tuple[int, ...]]:
        """Shapes of the null-text domain model's trained parameters, from the denoiser's: the
        UNet's minus attn2/norm2, plus one ``E_l`` per block (its width: the block's hidden
        size); an SDXL-style UNet's pooled-text input becomes a learned vector of its width."""
        removed = removed_prefixes(denoiser)
        shapes = [
            tuple(p.shape) for n, p in denoiser.named_parameters() if not n.startswith(removed)
        ]
        shapes += [(b.norm1.normalized_shape[0],) for _, b in transformer_blocks(denoiser)]
        if self.addition_embed_type is not None:
            config = denoiser.config
            shapes.append(
                (config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,)
            )
        return shapes

    def plan_step(
        self, config: dict[str, Any], batch: int, latent: int, train: bool
    ) -> tuple[nn.Module, list[nn.Module], Callable[[], torch.Tensor]]:
        """What one training step runs, for the plan's activation count: the network (built on
        the active fake mode in the default dtype), its blocks (gradient checkpointing
        recomputes one at a time) and its forward on random inputs of the step's shape.
        ``train``: stage 2 (the domain model: SD1.5's null-text UNet; an SDXL UNet is run with
        its text inputs, a slight overcount); else stage 1 (frozen weights, the text features
        require grad)."""
        null_text = train and self.addition_embed_type is None
        model = (
            NullTextUNet(unet_config=dict(config))
            if null_text
            else self.denoiser_from_config(config)
        )
        unet = model.unet if null_text else model
        c = unet.config
        sample = torch.randn(batch, c.in_channels, latent, latent)
        t = torch.full((batch,), 500)
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        if null_text:
            return model, blocks, lambda: model(sample, t).sample
        context = torch.randn(batch, 77, c.cross_attention_dim).requires_grad_(not train)
        pooled = time_ids = None
        if self.addition_embed_type is not None:
            width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            pooled, time_ids = torch.randn(batch, width), torch.randn(batch, 6)
        return model, blocks, lambda: self.predict(model, sample, t, context, pooled, time_ids)

    # --- prompts -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self, pipe: Any, texts: Sequence[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds [N, 77, D], pooled [N, P] or None)`` of ``texts``, as the family's
        diffusers pipeline encodes them (fp32 out when the encoders are fp32)."""
        return encode_text(pipe.tokenizer, pipe.text_encoder, texts, device), None

    def uncond_embeds(
        self, pipe: Any, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unconditional branch ``eps_sd(z, "")``'s text input, one row per prompt row."""
        embeds, pooled_u = self.encode_prompt(pipe, [""], prompt_embeds.device)
        rows = prompt_embeds.shape[0]
        embeds = embeds.to(prompt_embeds.dtype).expand(rows, -1, -1)
        return embeds, None if pooled_u is None else pooled_u.to(pooled.dtype).expand(rows, -1)

    # --- added conditions --------------------------------------------------------------------
    def time_ids(
        self, original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
    ) -> torch.Tensor | None:
        """The UNet's per-image size conditioning (``[B, 6]``), or None for families without."""
        return None

    def batch_time_ids(self, batch: dict) -> torch.Tensor | None:
        """:meth:`time_ids` of a training batch (its ``original_size``, ``crop_top_left`` and
        ``target_size``, recorded by the data module)."""
        if self.addition_embed_type is None:
            return None
        missing = [k for k in ("original_size", "crop_top_left", "target_size") if k not in batch]
        if missing:
            raise ValueError(
                f"model family '{self.name}' needs each image's {missing} in the batch "
                "(idgen.data.DomainImageDataModule records them)."
            )
        return self.time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])

    def added_cond_kwargs(
        self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """``added_cond_kwargs`` of a UNet call (None when the family has no added conditions)."""
        if self.addition_embed_type is None:
            return None
        return {"text_embeds": pooled, "time_ids": time_ids}

    # --- recognition -------------------------------------------------------------------------
    def owns_unet_config(self, config: Any) -> bool:
        """Whether a UNet config (dict or FrozenDict) is of this family."""
        config = dict(config)
        if "joint_attention_dim" in config or "transformer_config" in config:
            return False  # an MMDiT (SD3), not a UNet
        return config.get("addition_embed_type") == self.addition_embed_type


@dataclass(frozen=True)
class SDXLFamily(ModelFamily):
    """SDXL: two CLIP encoders, pooled text and size ids as added conditions, zero uncond."""

    @torch.no_grad()
    def encode_prompt(self, pipe, texts, device=None):
        # StableDiffusionXLPipeline.encode_prompt itself (both encoders' hidden_states[-2]
        # concatenated; pooled = encoder 2's projection), so training and sampling see exactly
        # what diffusers feeds the UNet.
        device = device if device is not None else pipe.text_encoder_2.device
        embeds, _, pooled, _ = StableDiffusionXLPipeline.encode_prompt(
            pipe, list(texts), device=device, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def uncond_embeds(self, pipe, prompt_embeds, pooled):
        if getattr(pipe.config, "force_zeros_for_empty_prompt", True):
            # diffusers' SDXL default: the unconditional branch is all zeros, not "".
            return torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        return super().uncond_embeds(pipe, prompt_embeds, pooled)

    def time_ids(self, original_size, crop_top_left, target_size):
        parts = [
            torch.as_tensor(x).reshape(-1, 2) for x in (original_size, crop_top_left, target_size)
        ]
        rows = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(rows, 2) for p in parts], dim=1).float()


@dataclass(frozen=True)
class SD3Family(ModelFamily):
    """SD3 / SD3.5: an MMDiT (``SD3Transformer2DModel``) over joint text tokens (two CLIPs'
    hidden states + optional T5) and a pooled vector, trained by flow matching; the
    unconditional branch is the encoding of ``""`` (as ``StableDiffusion3Pipeline`` does)."""

    @torch.no_grad()
    def encode_prompt(self, pipe, texts, device=None):
        # StableDiffusion3Pipeline.encode_prompt itself: CLIP-L and CLIP-G hidden states
        # concatenated, zero-padded to the T5 width, then the T5 tokens (zeros without T5);
        # pooled = both CLIP projections.
        device = device if device is not None else pipe.text_encoder.device
        texts = list(texts)
        embeds, _, pooled, _ = StableDiffusion3Pipeline.encode_prompt(
            pipe, texts, texts, texts, device=device, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def predict(self, model, noisy, t, context, pooled=None, time_ids=None):
        rows = noisy.shape[0]
        timestep = torch.as_tensor(t, device=noisy.device)
        return model(
            hidden_states=noisy,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=timestep.expand(rows) if timestep.ndim == 0 else timestep,
        ).sample

    def null_text_model(self, denoiser, text_features, pooled_features=None, **init):
        if pooled_features is None:
            raise ValueError(
                "an SD3 null-text transformer needs the pooled F^T beside F^T (the stage-1 file "
                "of an SD3 base holds both)."
            )
        return NullTextSD3Transformer.from_transformer(
            denoiser, text_features, pooled_features, init=init.get("init") or "value"
        )

    def domain_shapes(self, denoiser):
        # the whole transformer trains, plus the context sequence and the pooled vector
        config = denoiser.config
        return [tuple(p.shape) for p in denoiser.parameters()] + [
            (SD3_CONTEXT_LENGTH, config.joint_attention_dim),
            (config.pooled_projection_dim,),
        ]

    def plan_step(self, config, batch, latent, train):
        # The domain model is the transformer fed its learned context (NullTextSD3Transformer
        # keeps the text stream), so both stages run the transformer with the joint tokens;
        # stage 2's context is one learned row expanded (no per-row storage).
        model = self.denoiser_from_config(config)
        c = model.config
        sample = torch.randn(batch, c.in_channels, latent, latent)
        t = torch.full((batch,), 500)
        rows = 1 if train else batch
        context = torch.randn(rows, SD3_CONTEXT_LENGTH, c.joint_attention_dim)
        pooled = torch.randn(rows, c.pooled_projection_dim)
        if not train:
            context.requires_grad_(True)
            pooled.requires_grad_(True)
        context, pooled = context.expand(batch, -1, -1), pooled.expand(batch, -1)
        blocks = list(model.transformer_blocks)
        return model, blocks, lambda: self.predict(model, sample, t, context, pooled)

    def load_kwargs_for(self, folder):
        # diffusers loads an SD3 folder saved without T5 only when told text_encoder_3=None.
        index = Path(folder) / "model_index.json"
        kwargs = dict(self.load_kwargs)
        if not index.is_file():
            return kwargs  # a hub id: diffusers reads its index itself
        entries = json.loads(index.read_text(encoding="utf-8"))
        for name in ("text_encoder_3", "tokenizer_3"):
            if not (entries.get(name) or [None])[0]:
                kwargs[name] = None
        return kwargs

    def owns_unet_config(self, config):
        config = dict(config)
        return "joint_attention_dim" in dict(config.get("transformer_config", config))

    def base_traits(self, pipe):
        return {"text_encoder_3": getattr(pipe, "text_encoder_3", None) is not None}


#: Pipelines idgen refuses, with the reason (a folder of one is named in one line).
UNSUPPORTED: dict[str, str] = {
    name: (
        "FLUX.1-dev is guidance-distilled (the guidance scale is an input of its transformer) "
        "and FLUX.1-schnell is step-distilled without guidance: neither has an unconditional "
        "branch eps(z, '') to keep, so the paper's decoupled formula eps(z,'') + sum_i w_i "
        "(eps_i - eps(z,'')) does not apply; use an SD3/SD3.5 folder (model=sd3), which keeps "
        "real classifier-free guidance."
    )
    for name in ("FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline")
}

FAMILIES: dict[str, ModelFamily] = {
    "sd15": ModelFamily(
        name="sd15",
        class_names=(
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "InDomainPipeline",
        ),
        components=("vae", "text_encoder", "tokenizer", "unet", "scheduler"),
        txt2img=StableDiffusionPipeline,
        img2img=StableDiffusionImg2ImgPipeline,
        controlnet_pipeline=StableDiffusionControlNetPipeline,
        controlnet_class=ControlNetModel,
        default_resolution=512,
        build_tiny=build_tiny_sd,
        features=frozenset(
            {
                "baseline_finetune",
                "baselines",
                "baseline_tokens",
                "baseline_sampling",
                "baseline_rectify",
                "controlnet",
                "sds",
            }
        ),
        load_kwargs=(
            ("safety_checker", None),
            ("feature_extractor", None),
            ("requires_safety_checker", False),
        ),
    ),
    "sdxl": SDXLFamily(
        name="sdxl",
        class_names=(
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "InDomainXLPipeline",
        ),
        components=(
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "unet",
            "scheduler",
        ),
        txt2img=StableDiffusionXLPipeline,
        img2img=StableDiffusionXLImg2ImgPipeline,
        controlnet_pipeline=StableDiffusionXLControlNetPipeline,
        controlnet_class=ControlNetModel,
        default_resolution=1024,
        build_tiny=build_tiny_sdxl,
        addition_embed_type="text_time",
        load_kwargs=(("add_watermarker", False),),
        # baselines: fine-tuning, LoRA and OFT (UNet-side), trained with SDXL's pooled features
        # and time_ids, exported for StableDiffusionXLPipeline and sampled (baseline_model=);
        # not yet those learning a token (both encoders)
        features=frozenset(
            {
                "baseline_finetune",
                "baselines",
                "baseline_sampling",
                "baseline_rectify",
                "controlnet",
                "sds",
            }
        ),
    ),
    "sd3": SD3Family(
        name="sd3",
        class_names=(
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "InDomainSD3Pipeline",
        ),
        components=(
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "transformer",
            "scheduler",
        ),
        txt2img=StableDiffusion3Pipeline,
        img2img=StableDiffusion3Img2ImgPipeline,
        # diffusers' SD3 ControlNet pipeline needs SD3ControlNetModel; idgen's ControlNet path
        # is UNet-only, so SD3 names no ControlNet reference (None).
        controlnet_pipeline=None,
        controlnet_class=None,
        default_resolution=1024,
        build_tiny=build_tiny_sd3,
        denoiser_name="transformer",
        denoiser_class=SD3Transformer2DModel,
        training_objective="flow_matching",
        # vanilla fine-tuning of the transformer (the toy Table 1's baseline), exported for
        # StableDiffusion3Pipeline and sampled with baseline_model=
        features=frozenset({"baseline_finetune", "baseline_sampling"}),
    ),
}

FEATURE_NAMES = {
    "baseline_finetune": "the vanilla fine-tuning baseline",
    "baselines": "the Table-1 baselines that adapt the UNet (LoRA, OFT)",
    "baseline_rectify": "sampling a baseline rectified by the frozen base (baseline_mode=rectify)",
    "baseline_tokens": "a baseline that learns a placeholder token (textual inversion, Custom "
    "Diffusion)",
    "baseline_sampling": "sampling an exported baseline (baseline_model)",
    "controlnet": "ControlNet guidance",
    "sds": "score distillation (idgen-3d)",
}


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``model.family``), or a one-line error listing them."""
    if name not in FAMILIES:
        raise FamilyError(f"model.family={name!r} is not known; use one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


def folder_class_name(folder: str | os.PathLike) -> str | None:
    """``_class_name`` of a diffusers folder's ``model_index.json`` (None when there is none)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None


def _by_components(names: set[str]) -> ModelFamily | None:
    # The family whose components are all there, the one needing the most of them winning
    # (an SDXL folder also has SD1.5's text_encoder/tokenizer).
    fits = [f for f in FAMILIES.values() if set(f.components) <= names]
    return max(fits, key=lambda f: len(f.components)) if fits else None


def family_of(model: Any) -> ModelFamily:
    """The family of a loaded pipeline, a diffusers folder, or a UNet (or its config).

    Folders are recognised from ``model_index.json`` (``_class_name``, else its components);
    pipelines from their class, else their components; UNets from ``addition_embed_type``.
    """
    if isinstance(model, str | os.PathLike):
        name = folder_class_name(model)
        if name in UNSUPPORTED:
            raise FamilyError(
                f"'{model}' is a {name} folder, which idgen does not support: {UNSUPPORTED[name]}"
            )
        for family in FAMILIES.values():
            if name in family.class_names:
                return family
        index = Path(model) / "model_index.json"
        if index.is_file():
            keys = set(json.loads(index.read_text(encoding="utf-8")))
            found = _by_components(keys)
            if found is not None:
                return found
        raise FamilyError(
            f"'{model}' is not a diffusers pipeline folder idgen knows (model_index.json "
            f"_class_name={name!r}); known families: {sorted(FAMILIES)}."
        )
    config = getattr(model, "config", None)
    if hasattr(model, "components"):  # a DiffusionPipeline
        if type(model).__name__ in UNSUPPORTED:
            raise FamilyError(
                f"a {type(model).__name__} is not supported: {UNSUPPORTED[type(model).__name__]}"
            )
        for family in FAMILIES.values():
            if type(model).__name__ in family.class_names or isinstance(model, family.txt2img):
                return family
        found = _by_components({k for k, v in model.components.items() if v is not None})
        if found is not None:
            return found
        raise FamilyError(f"cannot tell the model family of a {type(model).__name__}.")
    unet_config = getattr(config, "unet_config", None) or config or model
    for family in FAMILIES.values():
        if family.owns_unet_config(unet_config):
            return family
    raise FamilyError(f"cannot tell the model family of {type(model).__name__}.")


def describe_folder(folder: str | os.PathLike) -> str:
    """What a folder is, for error messages: its family and ``_class_name``."""
    name = folder_class_name(folder)
    try:
        return f"a {family_of(folder).name} folder ({name})"
    except FamilyError:
        return f"a folder of {name or 'no known pipeline (no model_index.json)'}"


def check_folder_family(folder: str | os.PathLike, family: ModelFamily) -> None:
    """Raise :class:`FamilyError` (one line, before anything loads) when a folder's
    ``model_index.json`` says it is a pipeline of another family than ``family``."""
    name = folder_class_name(folder)
    if name is None:
        return  # no model_index.json: the missing-parts check names it
    if name in UNSUPPORTED:
        family_of(folder)  # raises, naming why
    try:
        found = family_of(folder)
    except FamilyError:
        return  # an unknown pipeline class: loading it explains itself
    if found is not family:
        raise FamilyError(
            f"'{folder}' is {describe_folder(folder)}, but model.family={family.name}; "
            f"use model={found.name} (or a model config of that family) for it."
        )
