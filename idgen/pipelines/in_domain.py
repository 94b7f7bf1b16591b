"""InDomainPipeline: guidance-decoupled multi-guidance sampling on a frozen SD1.5 (paper §3.2, §3.4).

    eps = eps_sd(z_t, "") + sum_i w_i (eps_i(z_t, c_i) - eps_sd(z_t, ""))        (paper Eq. 3)

over a list of :class:`GuidanceTerm`: ``w_d`` (domain model) and ``w_c`` (frozen SD with the
prompt, optionally with ControlNet) are two of them; with ``w_d = 0`` this is classifier-free
guidance with scale ``w_c``, as in diffusers. The mixing and per-term state live in
:class:`idgen.guidance.Guider`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor

from idgen.guidance import CONTROL, DOMAIN, GuidanceTerm, Guider, decoupled_terms, is_active
from idgen.models.text import accepts_text, encode_text
from idgen.pipelines.controlnet_residuals import Chunk, Control, chunk_residuals, split_multi
from idgen.pipelines.diffusers_call import (
    CheckedLoraMixin,
    DiffusersCallMixin,
    extra_step_kwargs,
    replaced_rows,
    rescale_guided,
    resolve_guidance_scale,
)

WeightMode = Literal["auto", "fixed"]
UNCOND = "uncond"  # the frozen SD's unconditional prediction eps_sd(z, "")
_WEIGHT_ARGS = {DOMAIN: "w_d", CONTROL: "w_c"}  # error messages name the call's arguments

# Written beside a saved pipeline so that plain diffusers finds the class:
# DiffusionPipeline.from_pretrained(folder, custom_pipeline=<folder>/pipeline.py, trust_remote_code=True)
PIPELINE_FILE = "pipeline.py"
_PIPELINE_SHIM = '''"""idgen's InDomainPipeline, for DiffusionPipeline.from_pretrained(custom_pipeline=...)."""

from idgen.pipelines.in_domain import InDomainPipeline

__all__ = ["InDomainPipeline"]
'''


@dataclass
class InDomainPipelineOutput(BaseOutput):
    """Images plus the guidance weights actually used, ``{term name: [B] tensor}``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    guidance_weights: dict[str, torch.Tensor]


@dataclass
class _Run:
    """What one term needs at run time: its model (None: the frozen SD), text rows, ControlNets."""

    model: Any
    embeds: torch.Tensor | None
    controls: list[Control] = field(default_factory=list)


def fix_scheduler_config(scheduler: Any) -> Any:
    """The corrections ``StableDiffusionPipeline.__init__`` makes to old SD scheduler configs.

    ``steps_offset`` is set to 1 and ``clip_sample`` to False (SD1.x checkpoints saved before
    these keys existed give different images otherwise, e.g. DDIM with its default
    ``clip_sample=True``). The scheduler is changed in place, as diffusers does.
    """
    if scheduler is None:
        return scheduler
    config = dict(scheduler.config)
    if config.get("steps_offset", 1) != 1:
        config["steps_offset"] = 1
    if config.get("clip_sample", False) is True:
        config["clip_sample"] = False
    if config != dict(scheduler.config):
        scheduler._internal_dict = FrozenDict(config)
    return scheduler


def make_scheduler(config: Any, name: str = "dpm++") -> Any:
    """A scheduler from an SD scheduler config: ``"dpm++"`` (paper) or any diffusers class name."""
    if name in ("dpm++", "dpmsolver++"):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(
            f"Unknown scheduler '{name}': use 'dpm++' or a diffusers scheduler class name such as "
            "'DDIMScheduler' or 'EulerDiscreteScheduler'."
        )
    return cls.from_config(config)


class InDomainPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    CheckedLoraMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
    DiffusersCallMixin,
):
    """Frozen SD1.5 + optional null-text domain UNet + optional ControlNet(s), multi-guidance sampling.

    Components: ``vae, text_encoder, tokenizer, unet`` (frozen SD), ``scheduler``, ``domain_unet``
    (a text-free model called as ``domain_unet(latents, t).sample``, e.g. ``NullTextUNet``;
    optional), ``controlnet`` (one ControlNet or a list; optional) and, for IP-Adapter,
    ``image_encoder`` / ``feature_extractor`` (optional). Like ``StableDiffusionPipeline`` it
    corrects old scheduler configs (``steps_offset``, ``clip_sample``), and has
    ``enable_vae_slicing`` / ``enable_vae_tiling``, ``enable_freeu``, ``fuse_qkv_projections``,
    ``from_pipe`` (``InDomainPipeline.from_pipe(sd_pipe, domain_unet=...)`` shares ``sd_pipe``'s
    models), ``from_single_file`` (an original-layout SD1.5 ``.safetensors``; offline give
    ``config=<a diffusers SD1.5 folder>``), ``load_lora_weights``, ``load_textual_inversion`` and
    ``load_ip_adapter``.

    LoRA, textual inversion, IP-Adapter and FreeU act on the frozen SD (``unet`` and
    ``text_encoder``), i.e. on the control term *and* the unconditional prediction, exactly as on
    ``StableDiffusionPipeline``: at ``w_d=0`` the images equal SD's with the same adapters. To put a
    LoRA or a community checkpoint on the control term only (the paper's "customized model"),
    load it into a separate SD pipeline and give its UNet (and text encoder) as the control term,
    so that ``eps_sd(z, "")`` stays the plain frozen SD::

        custom = StableDiffusionPipeline.from_single_file("community.safetensors", config=sd_dir)
        custom.load_lora_weights("style_lora.safetensors")      # optional
        pipe(prompt, guidance=[
            GuidanceTerm("domain", "domain_unet", weight=3.5),
            GuidanceTerm("control", custom.unet, text_encoder=custom.text_encoder, weight=3.5),
        ])

    From the command line: ``idgen-sample sampler=rectify sampler.extra_guidance.0.model=<folder or
    .safetensors>`` (with ``sampler.extra_guidance.0.lora=[{path: ..., scale: ...}]``), while
    ``sampler.lora=[...]`` loads LoRAs into the frozen SD as ``load_lora_weights`` does.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->controlnet->unet->domain_unet->vae"
    _optional_components = ["domain_unet", "controlnet", "image_encoder", "feature_extractor"]
    # What callback_on_step_end may ask for: the latents (may be replaced), the control term's
    # text rows (``prompt_embeds``) and the unconditional rows (``negative_prompt_embeds``), both
    # replaceable from the next step on (diffusers' names; SD hands them over concatenated when
    # CFG is on, we hand them over apart), the mixed prediction, eps_sd(z, ""), this step's fresh
    # term predictions and the weights of the active terms (return ``guidance_weights`` to change
    # them; ``pipeline._guidance_scale`` changes the control weight as in diffusers).
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "noise_pred",
        "eps_uncond",
        "guidance_preds",
        "guidance_weights",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: Any,
        tokenizer: Any,
        unet: UNet2DConditionModel,
        scheduler: Any,
        domain_unet: Any = None,
        controlnet: Any = None,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ):
        super().__init__()
        fix_scheduler_config(scheduler)
        if isinstance(controlnet, list | tuple):
            controlnet = MultiControlNetModel(controlnet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            domain_unet=domain_unet,
            controlnet=controlnet,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @classmethod
    def from_sd(
        cls,
        sd: DiffusionPipeline,
        domain_unet: Any = None,
        controlnet: Any = None,
        scheduler: str | Any = "dpm++",
    ) -> InDomainPipeline:
        """Wrap a loaded SD pipeline's components; ``scheduler`` defaults to DPM-Solver++ (paper)."""
        if isinstance(scheduler, str):
            scheduler = make_scheduler(sd.scheduler.config, scheduler)
        pipe = cls(
            vae=sd.vae,
            text_encoder=sd.text_encoder,
            tokenizer=sd.tokenizer,
            unet=sd.unet,
            scheduler=scheduler,
            domain_unet=domain_unet,
            controlnet=controlnet,
            image_encoder=getattr(sd, "image_encoder", None),
            feature_extractor=getattr(sd, "feature_extractor", None),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ----------------------------------------------------------------------------- diffusers helpers

    def enable_vae_slicing(self) -> None:
        """Decode one image at a time (less memory for large batches; same images)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping tiles (large resolutions in bounded memory; blended seams)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` plus ``pipeline.py``, so that plain diffusers loads it:
        ``DiffusionPipeline.from_pretrained(d, custom_pipeline=f"{d}/pipeline.py", trust_remote_code=True)``.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / PIPELINE_FILE).write_text(_PIPELINE_SHIM, encoding="utf-8")

    # ----------------------------------------------------------------------------- helpers

    @torch.no_grad()
    def encode_text(
        self, texts: list[str], device: torch.device, text_encoder: Any = None
    ) -> torch.Tensor:
        """CLIP features ``[len(texts), 77, D]`` exactly as diffusers' ``encode_prompt`` makes them."""
        text_encoder = text_encoder or self.text_encoder
        embeds = encode_text(self.tokenizer, text_encoder, texts, device)
        return embeds.to(dtype=text_encoder.dtype, device=device)

    def _per_image(self, embeds: torch.Tensor, batch: int, n: int) -> torch.Tensor:
        """One row per image: a single embedding is repeated, per-prompt rows interleaved."""
        if embeds.shape[0] == 1:
            return embeds.expand(batch * n, *embeds.shape[1:]).contiguous()
        if embeds.shape[0] != batch:
            raise ValueError(f"got {embeds.shape[0]} text embeddings for {batch} prompts")
        return embeds.repeat_interleave(n, dim=0)

    def _term_embeds(self, text: str | list[str], batch: int, n: int, device, encoder=None):
        """A guidance term's text rows, one per image. On the frozen SD's own encoder the text is
        encoded as the call's prompt is (``encode_prompt``: textual-inversion tokens, the call's
        LoRA scale and ``clip_skip``); a term's own encoder (a community model's) plainly."""
        texts = [text] if isinstance(text, str) else list(text)
        if encoder is None or encoder is self.text_encoder:
            embeds, _ = self.encode_prompt(
                texts,
                device,
                1,
                False,
                lora_scale=self._lora_scale_of_call,
                clip_skip=self.clip_skip,
            )
        else:
            embeds = self.encode_text(texts, device, encoder)
        return self._per_image(embeds, batch, n)

    def _control_images(self, image: Any, height: int, width: int, batch: int, n: int, device):
        """diffusers' ``prepare_image``: resize to (height, width), [0, 1], one row per image."""
        img = self.control_image_processor.preprocess(image, height=height, width=width)
        img = img.to(dtype=torch.float32)
        img = img.repeat_interleave(batch * n if img.shape[0] == 1 else n, dim=0)
        return img.to(device=device)

    def _controls(self, controlnet, image, scale, height, width, batch, n, device) -> list[Control]:
        """One :class:`Control` per net of ``controlnet`` (one net or a MultiControlNetModel)."""
        multi = isinstance(controlnet, MultiControlNetModel)
        images = image if multi else [image]
        count = len(controlnet.nets) if multi else 1
        scales = list(scale) if isinstance(scale, list | tuple) else [float(scale)] * count
        images = [self._control_images(im, height, width, batch, n, device) for im in images]
        return split_multi(controlnet, images, scales)

    def _sdedit_latents(self, image, timestep, rows, dtype, device, generator):
        """diffusers' img2img ``prepare_latents``: encode, repeat per image, noise to ``timestep``."""
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, list) and image.shape[0] != rows:
            # One generator per output image: encode one copy per image (as diffusers does).
            if rows % image.shape[0] != 0:
                raise ValueError(f"got {image.shape[0]} input images for {rows} outputs")
            image = torch.cat([image] * (rows // image.shape[0]), dim=0)
        if image.shape[1] == self.vae.config.latent_channels:
            init = image
        else:
            if isinstance(generator, list):
                init = torch.cat(
                    [
                        retrieve_latents(self.vae.encode(image[i : i + 1]), generator=g)
                        for i, g in enumerate(generator)
                    ]
                )
            else:
                init = retrieve_latents(self.vae.encode(image), generator=generator)
            init = self.vae.config.scaling_factor * init
        if rows % init.shape[0] != 0:
            raise ValueError(
                f"got {init.shape[0]} input images for {rows} outputs; pass one image, or one per "
                "prompt x num_images_per_prompt."
            )
        init = torch.cat([init] * (rows // init.shape[0]), dim=0)
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init, noise, timestep)

    def prepare_timesteps(
        self,
        num_inference_steps: int,
        image: Any,
        strength: float,
        device: torch.device,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> torch.Tensor:
        """The scheduler's timesteps (custom ``timesteps`` / ``sigmas`` through diffusers'
        ``retrieve_timesteps``); SDEdit (``image`` given) keeps their last ``strength`` part."""
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        if image is not None:
            # SDEdit starts part-way: skip the first (1 - strength) of the schedule (diffusers img2img).
            init_steps = min(int(num_inference_steps * strength), num_inference_steps)
            t_start = max(num_inference_steps - init_steps, 0)
            timesteps = timesteps[t_start * self.scheduler.order :]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(t_start * self.scheduler.order)
        if len(timesteps) == 0:
            raise ValueError(
                f"strength={strength} with {num_inference_steps} steps leaves no denoising step"
            )
        return timesteps

    def _guidance_terms(
        self,
        guidance: Sequence[GuidanceTerm] | None,
        w_d: float | None,
        w_c: float | None,
        domain_interval: Sequence[float],
        control_interval: Sequence[float],
        extra_guidance: Sequence[GuidanceTerm],
        weights: WeightMode,
    ) -> list[GuidanceTerm]:
        """The call's one list of terms, named, unique, with weight-0 terms dropped."""
        if guidance is None:
            if w_d is None and self.domain_unet is None:
                w_d = 0.0  # no domain model: the automatic domain term is simply absent
            # unnamed extra terms are named by their position in extra_guidance
            extra = [
                g if g.name else replace(g, name=f"extra_{i}") for i, g in enumerate(extra_guidance)
            ]
            guidance = [*decoupled_terms(w_d, w_c, domain_interval, control_interval), *extra]
        elif (w_d, w_c, list(extra_guidance)) != (None, None, []):
            raise ValueError(
                "give the guidance terms either as guidance=[...] or as w_d / w_c / "
                "extra_guidance, not both"
            )
        terms: list[GuidanceTerm] = []
        for i, g in enumerate(guidance):
            if not g.name:
                g = replace(g, name=f"extra_{i}")
            if any(t.name == g.name for t in terms):
                raise ValueError(
                    f"guidance term name '{g.name}' is used twice; names must be unique"
                )
            label = _WEIGHT_ARGS.get(g.name, f"GuidanceTerm '{g.name}'")
            if isinstance(g.model, str) and getattr(self, g.model, None) is None:
                raise ValueError(
                    f"{label}: the pipeline has no {g.model}; pass {g.model}=... when building "
                    f"it (e.g. domain_unet=NullTextUNet...) or set {label}=0 / None."
                )
            if g.weight == 0:
                continue
            if weights == "fixed" and g.weight == "auto":
                raise ValueError(f"weights='fixed' needs a number for {label} (got 'auto')")
            is_active(0, 1, g.start, g.end)  # raises on a malformed interval, naming it
            terms.append(g)
        return terms

    def _run_inputs(
        self,
        term: GuidanceTerm,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor,
        controls: list[Control],
        batch: int,
        n: int,
        height: int,
        width: int,
        device,
    ) -> _Run:
        """Resolve a term's model, text rows and ControlNets for this call."""
        model = getattr(self, term.model) if isinstance(term.model, str) else term.model
        embeds = None
        if model is None or accepts_text(model):
            if term.prompt_embeds is not None:
                embeds = self._per_image(term.prompt_embeds.to(device), batch, n)
            elif term.prompt is not None:
                embeds = self._term_embeds(term.prompt, batch, n, device, term.text_encoder)
            elif term.text_encoder is None:
                embeds = prompt_embeds  # no prompt of its own: the call's prompt
            elif prompt is not None:
                embeds = self._term_embeds(prompt, batch, n, device, term.text_encoder)
            else:
                raise ValueError(
                    f"GuidanceTerm '{term.name}' has its own text_encoder but no prompt; give "
                    "it a prompt (the call's prompt_embeds come from another encoder)."
                )
        own = []
        if term.controlnet is not None:
            own = self._controls(
                term.controlnet,
                term.control_image,
                term.controlnet_conditioning_scale,
                height,
                width,
                batch,
                n,
                device,
            )
        # The call's control_image drives the pipeline's ControlNet(s) in the "control" term.
        return _Run(model, embeds, own + (controls if term.name == CONTROL else []))

    def _model_prediction(self, name: str, run: _Run, latent_in: torch.Tensor, t) -> torch.Tensor:
        """One forward of a model other than the frozen SD UNet (domain UNet, community UNet)."""
        model = run.model
        x = latent_in.to(model.dtype)
        if run.embeds is None:
            eps = model(x, t, return_dict=False)[0]
        else:
            chunk = Chunk(name, run.embeds.to(model.dtype), run.controls)
            down, mid = chunk_residuals(x, t, [chunk])
            eps = model(
                x,
                t,
                encoder_hidden_states=chunk.embeds,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
        return eps.to(latent_in.dtype)

    def _sd_predictions(
        self,
        latent_in: torch.Tensor,
        t,
        chunks: list[Chunk],
        ip_embeds: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ):
        """All frozen-SD predictions (uncond + text terms) in ONE batched UNet forward.

        The call's ``cross_attention_kwargs`` (LoRA ``scale``) reach the frozen UNet; IP-Adapter
        image embeddings ``(negative, positive)`` go with the unconditional / text chunks, as
        diffusers' CFG batch pairs them.
        """
        x = latent_in if len(chunks) == 1 else torch.cat([latent_in] * len(chunks))
        embeds = torch.cat([c.embeds for c in chunks])
        down, mid = chunk_residuals(x, t, chunks)
        added = None
        if ip_embeds is not None:
            negative, positive = ip_embeds
            added = {
                "image_embeds": [
                    torch.cat([neg if c.name == UNCOND else pos for c in chunks])
                    for neg, pos in zip(negative, positive, strict=True)
                ]
            }
        eps = self.unet(
            x,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return eps.chunk(len(chunks))

    # ----------------------------------------------------------------------------- call steps

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        weights: WeightMode,
        num_inference_steps: int,
        image: Any,
        strength: float,
        height: int,
        width: int,
        callback_on_step_end_tensor_inputs: list[str],
        control_image: Any,
        custom_schedule: bool = False,
    ) -> None:
        """Raise on bad call arguments before any model runs (diffusers' ``check_inputs``)."""
        if weights not in get_args(WeightMode):
            raise ValueError(f"weights must be 'auto' or 'fixed', got {weights!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt (a string or list of strings) or prompt_embeds")
        if not custom_schedule and (num_inference_steps is None or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if image is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}"
            )
        bad = [
            k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs
        ]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only hold {self._callback_tensor_inputs}, "
                f"got {bad}"
            )
        if control_image is not None and self.controlnet is None:
            raise ValueError(
                "control_image was given but the pipeline has no controlnet; build it with "
                "controlnet=ControlNetModel(...) or drop control_image."
            )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``StableDiffusionPipeline.encode_prompt``, the same signature, return and code.

        ``(prompt_embeds, negative_prompt_embeds)``, ``num_images_per_prompt`` rows per prompt;
        textual-inversion tokens are expanded, ``lora_scale`` scales the text encoder's LoRA
        layers, ``clip_skip`` takes an earlier CLIP layer; the negative rows are ``None`` unless
        ``do_classifier_free_guidance``. Code written for SD's ``encode_prompt`` works unchanged.
        (With transformers 5, whose ``CLIPTextModel`` has no ``text_model``, SD's own
        ``clip_skip`` raises; here the skipped-layer features are made as SD makes them.)
        """
        if clip_skip is not None and prompt_embeds is None:
            prompt_embeds = self._clip_skip_embeds(prompt, device, clip_skip, lora_scale)
            clip_skip = None  # SD encodes the negative prompt without clip_skip, so do we
        return StableDiffusionPipeline.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    def _clip_skip_embeds(
        self, prompt: str | list[str], device: torch.device, clip_skip: int, lora_scale
    ) -> torch.Tensor:
        """SD's ``clip_skip`` features: the hidden states ``clip_skip`` layers before the last,
        through the final layer norm (textual-inversion tokens expanded, LoRA scaled)."""
        texts = self.maybe_convert_prompt(
            [prompt] if isinstance(prompt, str) else prompt, self.tokenizer
        )
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = ids.attention_mask.to(device)
        model = getattr(self.text_encoder, "text_model", self.text_encoder)
        if lora_scale is not None and USE_PEFT_BACKEND:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            hidden = self.text_encoder(
                ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True
            ).hidden_states[-(clip_skip + 1)]
            return model.final_layer_norm(hidden)
        finally:
            if lora_scale is not None and USE_PEFT_BACKEND:
                unscale_lora_layers(self.text_encoder, lora_scale)

    def encode_image(self, image, device, num_images_per_prompt, output_hidden_states=None):
        """``StableDiffusionPipeline.encode_image`` (IP-Adapter's image features and zeros)."""
        return StableDiffusionPipeline.encode_image(
            self, image, device, num_images_per_prompt, output_hidden_states
        )

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image,
        ip_adapter_image_embeds,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
    ):
        """``StableDiffusionPipeline.prepare_ip_adapter_image_embeds``: one tensor per adapter,
        ``[negative; positive]`` rows when ``do_classifier_free_guidance``."""
        return StableDiffusionPipeline.prepare_ip_adapter_image_embeds(
            self,
            ip_adapter_image,
            ip_adapter_image_embeds,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
        )

    def _call_prompt_embeds(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        batch: int,
        n: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's prompt and unconditional rows ``[batch * n, 77, D]`` through
        :meth:`encode_prompt`, with what it does not take: a single negative prompt (or one
        negative embedding row) for a list of prompts is used for every prompt."""
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = self._per_image(negative_prompt_embeds.to(device), batch, 1)
        if isinstance(negative_prompt, str) and isinstance(prompt, list):
            negative_prompt = [negative_prompt] * batch
        if isinstance(negative_prompt, list) and isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch}; "
                "give one negative prompt per prompt or a single string."
            )
        return self.encode_prompt(
            prompt,
            device,
            n,
            True,  # eps_sd(z, "") is every term's base: the unconditional rows are always needed
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=self._lora_scale_of_call,
            clip_skip=self.clip_skip,
        )

    def prepare_runs(
        self,
        terms: list[GuidanceTerm],
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        control_image: Any,
        controlnet_conditioning_scale: float | list[float],
        controlnet_on_uncond: bool,
        batch: int,
        n: int,
        height: int,
        width: int,
        device: torch.device,
    ) -> tuple[dict[str, _Run], Chunk]:
        """What each term runs (``{term name: _Run}``) and the unconditional SD chunk.

        The call's ``control_image`` is prepared once for the pipeline's ControlNet(s); it drives
        the ``"control"`` term, and the unconditional prediction too if ``controlnet_on_uncond``.
        """
        controls = []
        if control_image is not None:
            controls = self._controls(
                self.controlnet,
                control_image,
                controlnet_conditioning_scale,
                height,
                width,
                batch,
                n,
                device,
            )
        runs = {
            g.name: self._run_inputs(
                g, prompt, prompt_embeds, controls, batch, n, height, width, device
            )
            for g in terms
        }
        uncond = Chunk(UNCOND, negative_embeds, controls if controlnet_on_uncond else [])
        return runs, uncond

    def prepare_latents(
        self,
        image: Any,
        latents: torch.Tensor | None,
        timesteps: torch.Tensor,
        rows: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """The starting latents: the noised input ``image`` for SDEdit, else (given) noise.

        SDEdit encodes ``image`` and noises it to ``timesteps[0]``; otherwise ``latents`` (or fresh
        noise from ``generator``) is scaled by the scheduler's ``init_noise_sigma``.
        """
        if image is not None:
            pixels = self.image_processor.preprocess(image)
            return self._sdedit_latents(
                pixels, timesteps[:1].repeat(rows), rows, dtype, device, generator
            )
        shape = (
            rows,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def decode_images(
        self,
        latents: torch.Tensor,
        output_type: str,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """VAE-decode and postprocess to ``output_type`` (``"latent"``: the latents as they are)."""
        if output_type == "latent":
            return latents
        decoded = self.vae.decode(
            latents / self.vae.config.scaling_factor, return_dict=False, generator=generator
        )[0]
        return self.image_processor.postprocess(
            decoded, output_type=output_type, do_denormalize=[True] * decoded.shape[0]
        )

    # ----------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        w_d: float | None = None,
        w_c: float | None = None,
        w0: float = 7.0,
        weights: WeightMode = "auto",
        num_inference_steps: int = 100,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        controlnet_on_uncond: bool = False,
        image: Any = None,
        strength: float = 0.8,
        extra_guidance: Sequence[GuidanceTerm] | None = None,
        domain_interval: Sequence[float] = (0.0, 1.0),
        control_interval: Sequence[float] = (0.0, 1.0),
        guidance: Sequence[GuidanceTerm] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        eta: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ) -> InDomainPipelineOutput | tuple:
        """Sample with ``eps_sd(z,"") + sum_i w_i (eps_i - eps_sd(z,""))`` over the active terms.

        Terms: ``guidance=[GuidanceTerm, ...]`` (the whole list), or the shorthand ``w_d`` (domain
        model), ``w_c`` (frozen SD with ``prompt`` and, if ``control_image`` is given, the
        pipeline's ControlNet(s)), their ``*_interval`` and ``extra_guidance`` terms. A weight of
        ``None`` (``"auto"`` in a term) is set at the term's first active step to
        ``w0 / K * |eps_sd| / |eps_i|`` per sample (K = number of terms; the paper's ``w0/2``
        for domain + control) and held; ``weights="fixed"`` requires numbers. A weight of 0 drops
        the term and its forward pass. ``image`` + ``strength`` is SDEdit.
        ``controlnet_on_uncond=True`` also feeds the ControlNet to the unconditional prediction,
        as diffusers' ControlNet pipeline does (the paper leaves ``eps_sd(z, "")`` plain).

        diffusers' arguments, with ``StableDiffusionPipeline``'s meaning (equal images at
        ``w_d=0``): ``guidance_scale`` is ``w_c`` in diffusers' units (at or below 1 guidance is
        off: the prompt's prediction alone; give it or ``w_c``, not both), ``guidance_rescale``
        (Lin et al., on the combined prediction, toward the control term's prediction),
        ``timesteps`` / ``sigmas`` (custom schedules), ``eta`` (DDIM), ``cross_attention_kwargs``
        (``{"scale": s}``: the LoRA scale on the frozen SD's UNet and text encoder), ``clip_skip``,
        ``ip_adapter_image`` / ``ip_adapter_image_embeds`` (after ``load_ip_adapter``; the image
        conditions the frozen SD's text terms, zeros its unconditional prediction).
        ``callback_on_step_end`` (a function or diffusers ``PipelineCallback``) gets the tensors
        named in ``callback_on_step_end_tensor_inputs`` (see ``_callback_tensor_inputs``) and may
        change the weights mid-run: ``pipeline._guidance_scale`` (as diffusers'
        ``SDCFGCutoffCallback`` does) or a returned ``guidance_weights`` dict; ``pipeline._interrupt
        = True`` skips the remaining steps.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        w_c = resolve_guidance_scale(guidance_scale, w_c)

        # 0. Default height and width to unet
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_embeds,
            weights,
            num_inference_steps,
            image,
            strength,
            height,
            width,
            callback_on_step_end_tensor_inputs,
            control_image,
            custom_schedule=timesteps is not None or sigmas is not None,
        )
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("give ip_adapter_image or ip_adapter_image_embeds, not both")
        self._start_call(
            guidance_scale if guidance_scale is not None else w_c,
            guidance_rescale,
            clip_skip,
            cross_attention_kwargs,
        )

        # 2. Define call parameters
        if prompt_embeds is not None:
            batch = prompt_embeds.shape[0]
        else:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        n = num_images_per_prompt
        rows = batch * n
        if isinstance(generator, list) and len(generator) != rows:
            raise ValueError(
                f"got {len(generator)} generators for {rows} images (prompts x "
                "num_images_per_prompt); pass one generator per image or a single one."
            )
        device = self._execution_device

        # 3. Encode the prompt and the unconditional (negative) prompt (LoRA scale, clip_skip)
        prompt_embeds, negative_embeds = self._call_prompt_embeds(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, n, device
        )
        ip_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            # [negative; positive] rows per adapter, as diffusers prepares them for CFG
            per_adapter = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, rows, True
            )
            pairs = [e.chunk(2) for e in per_adapter]
            ip_embeds = ([neg for neg, _ in pairs], [pos for _, pos in pairs])

        # 4. Guidance terms: one list (w_d and w_c are two of them) and what each runs
        terms = self._guidance_terms(
            guidance,
            w_d,
            w_c,
            domain_interval,
            control_interval,
            list(extra_guidance or []),
            weights,
        )
        runs, uncond = self.prepare_runs(
            terms,
            prompt,
            prompt_embeds,
            negative_embeds,
            control_image,
            controlnet_conditioning_scale,
            controlnet_on_uncond,
            batch,
            n,
            height,
            width,
            device,
        )

        # 5. Prepare timesteps (custom timesteps / sigmas; SDEdit keeps the last `strength` part)
        timesteps = self.prepare_timesteps(
            num_inference_steps, image, strength, device, timesteps, sigmas
        )
        guider = Guider(terms, num_steps=len(timesteps), w0=w0)
        self._num_timesteps = len(timesteps)

        # 6. Prepare latent variables: pure noise, or the noised input image for SDEdit
        latents = self.prepare_latents(
            image, latents, timesteps, rows, height, width, prompt_embeds.dtype, device, generator
        )

        # 7. Prepare extra step kwargs (eta, generator)
        step_kwargs = extra_step_kwargs(self.scheduler, generator, eta)

        # 8. Denoising loop
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                # 8.1 Terms that need a prediction now (active, and not reusing an earlier one)
                fresh = guider.to_predict(i)
                latent_in = self.scheduler.scale_model_input(latents, t)

                # 8.2 Frozen SD: uncond + every SD text term, in one batched forward
                sd_terms = [g.name for g in fresh if runs[g.name].model is None]
                chunks = [uncond] + [
                    Chunk(name, runs[name].embeds, runs[name].controls) for name in sd_terms
                ]
                eps_uncond, *eps_text = self._sd_predictions(latent_in, t, chunks, ip_embeds)
                preds = dict(zip(sd_terms, eps_text, strict=True))

                # 8.3 Domain UNet and other models: one forward each
                for g in fresh:
                    if runs[g.name].model is not None:
                        preds[g.name] = self._model_prediction(g.name, runs[g.name], latent_in, t)

                # 8.4 Combine: eps_0 + sum_i w_i (eps_i - eps_0), weights held by the guider;
                # diffusers' guidance_rescale toward the control term's prediction
                noise_pred = guider.combine(i, eps_uncond, preds)
                self._sync_guidance_scale(guider)
                # rescale first: do_classifier_free_guidance reads a weight tensor (a host sync)
                if self.guidance_rescale > 0.0 and self.do_classifier_free_guidance:
                    reference = preds.get(CONTROL, next(iter(preds.values()), None))
                    noise_pred = rescale_guided(noise_pred, reference, self.guidance_rescale)

                # 8.5 Compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(
                    noise_pred, t, latents, **step_kwargs, return_dict=False
                )[0]

                # 8.6 Step-end callback (may replace latents and text rows, change weights)
                if callback_on_step_end is not None:
                    latents, uncond = self._step_end(
                        callback_on_step_end,
                        callback_on_step_end_tensor_inputs,
                        guider,
                        i,
                        t,
                        runs,
                        uncond,
                        rows,
                        {
                            "latents": latents,
                            "noise_pred": noise_pred,
                            "eps_uncond": eps_uncond,
                            "guidance_preds": preds,
                        },
                    )
                progress_bar.update()

        # 9. Decode
        images = self.decode_images(latents, output_type, generator)
        self.maybe_free_model_hooks()

        used = guider.used_weights(rows)
        if not return_dict:
            return images, used
        return InDomainPipelineOutput(images=images, guidance_weights=used)

    def _step_end(
        self,
        callback: Callable[..., dict],
        names: list[str],
        guider: Guider,
        step: int,
        t: Any,
        runs: dict[str, _Run],
        uncond: Chunk,
        rows: int,
        tensors: dict[str, Any],
    ) -> tuple[torch.Tensor, Chunk]:
        """Run the step-end callback; apply what it returns (latents, the control term's and the
        unconditional text rows, weights) from the next step on."""
        control = runs.get(CONTROL)
        available = {
            **tensors,
            "prompt_embeds": control.embeds if control is not None else None,
            "negative_prompt_embeds": uncond.embeds,
            "guidance_weights": {g.name: guider.weights[g.name] for g in guider.active(step)},
        }
        kwargs = {k: available[k] for k in names}
        scale_before = self._guidance_scale
        out = dict(callback(self, step, t, kwargs))
        latents = out.pop("latents", tensors["latents"])
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            new = replaced_rows(out, key, available[key], rows, step)
            if new is None:
                continue
            if key == "negative_prompt_embeds":
                uncond = replace(uncond, embeds=new)
            elif control is not None and control.model is None:
                control.embeds = new
            else:
                raise ValueError(
                    "callback_on_step_end returned prompt_embeds, but this run's control term "
                    "does not run on the frozen SD (w_c=0 or a model of its own)."
                )
        self._apply_callback_weights(guider, step, scale_before, out)
        return latents, uncond
