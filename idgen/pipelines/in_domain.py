"""InDomainPipeline: guidance-decoupled multi-guidance sampling on a frozen SD1.5 (paper §3.2, §3.4).

    eps = eps_sd(z_t, "") + w_d (eps_d(z_t) - eps_sd(z_t, "")) + w_c (eps_c(z_t, c) - eps_sd(z_t, ""))
        + sum_i w_i (eps_i(z_t, c_i) - eps_sd(z_t, ""))

which equals the paper's ``(1 - w_d - w_c) eps_sd + w_d eps_d + w_c eps_c`` and, with ``w_d = 0``,
classifier-free guidance with scale ``w_c``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from idgen.guidance import GuidanceTerm, auto_weight, is_active, multi_guidance
from idgen.pipelines.controlnet_residuals import Chunk, Control, chunk_residuals, split_multi

WeightMode = Literal["auto", "fixed"]


@dataclass
class InDomainPipelineOutput(BaseOutput):
    """Images plus the guidance weights actually used, ``{term name: [B] tensor}``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    guidance_weights: dict[str, torch.Tensor]


@dataclass
class _Term:
    """A guidance term resolved for one call: what to run and how to weigh it."""

    name: str
    kind: Literal["sd", "domain", "model"]
    weight: float | Literal["auto"]
    start: float = 0.0
    end: float = 1.0
    embeds: torch.Tensor | None = None
    model: Any = None
    controls: list[Control] | None = None


def _accepts_text(model: Any) -> bool:
    return "encoder_hidden_states" in inspect.signature(model.forward).parameters


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


class InDomainPipeline(DiffusionPipeline):
    """Frozen SD1.5 + optional null-text domain UNet + optional ControlNet(s), multi-guidance sampling.

    Components: ``vae, text_encoder, tokenizer, unet`` (frozen SD), ``scheduler``, ``domain_unet``
    (a text-free model called as ``domain_unet(latents, t).sample``, e.g. ``NullTextUNet``;
    optional) and ``controlnet`` (one ControlNet or a list; optional).
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->domain_unet->vae"
    _optional_components = ["domain_unet", "controlnet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: Any,
        tokenizer: Any,
        unet: UNet2DConditionModel,
        scheduler: Any,
        domain_unet: Any = None,
        controlnet: Any = None,
    ):
        super().__init__()
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
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ----------------------------------------------------------------------------- helpers

    @torch.no_grad()
    def encode_text(
        self, texts: list[str], device: torch.device, text_encoder: Any = None
    ) -> torch.Tensor:
        """CLIP features ``[len(texts), 77, D]`` exactly as diffusers' ``encode_prompt`` makes them."""
        text_encoder = text_encoder or self.text_encoder
        inputs = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(device)
        embeds = text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=text_encoder.dtype, device=device)

    def _per_image(self, embeds: torch.Tensor, batch: int, n: int) -> torch.Tensor:
        """One row per image: a single embedding is repeated, per-prompt rows interleaved."""
        if embeds.shape[0] == 1:
            return embeds.expand(batch * n, *embeds.shape[1:]).contiguous()
        if embeds.shape[0] != batch:
            raise ValueError(f"got {embeds.shape[0]} text embeddings for {batch} prompts")
        return embeds.repeat_interleave(n, dim=0)

    def _prompt_embeds(self, text: str | list[str], batch: int, n: int, device, encoder=None):
        texts = [text] if isinstance(text, str) else list(text)
        return self._per_image(self.encode_text(texts, device, encoder), batch, n)

    def _control_images(self, image: Any, height: int, width: int, batch: int, n: int, device):
        """diffusers' ``prepare_image``: resize to (height, width), [0, 1], one row per image."""
        img = self.control_image_processor.preprocess(image, height=height, width=width)
        img = img.to(dtype=torch.float32)
        img = img.repeat_interleave(batch * n if img.shape[0] == 1 else n, dim=0)
        return img.to(device=device)

    def _pipeline_controls(self, control_image, scale, height, width, batch, n, device):
        if control_image is None:
            return []
        if self.controlnet is None:
            raise ValueError(
                "control_image was given but the pipeline has no controlnet; build it with "
                "controlnet=ControlNetModel(...) or drop control_image."
            )
        multi = isinstance(self.controlnet, MultiControlNetModel)
        images = control_image if multi else [control_image]
        count = len(self.controlnet.nets) if multi else 1
        scales = list(scale) if isinstance(scale, list | tuple) else [float(scale)] * count
        images = [self._control_images(im, height, width, batch, n, device) for im in images]
        return split_multi(self.controlnet, images, scales)

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

    def _timesteps(self, num_inference_steps: int, strength: float | None, device):
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if strength is None:
            return timesteps
        # SDEdit starts part-way: skip the first (1 - strength) of the schedule (diffusers img2img).
        init_steps = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_steps, 0)
        timesteps = timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps

    def _resolve_terms(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        w_d: float | None,
        w_c: float | None,
        weights: WeightMode,
        controls: list[Control],
        extra_guidance: list[GuidanceTerm],
        batch: int,
        n: int,
        height: int,
        width: int,
        device,
    ) -> list[_Term]:
        def spec(w: float | None, name: str) -> float | Literal["auto"]:
            if w is None:
                if weights == "fixed":
                    raise ValueError(f"weights='fixed' needs a number for {name}")
                return "auto"
            return float(w)

        terms: list[_Term] = []
        if self.domain_unet is not None and w_d != 0:
            terms.append(_Term("domain", "domain", spec(w_d, "w_d"), model=self.domain_unet))
        elif self.domain_unet is None and w_d not in (None, 0):
            raise ValueError(
                f"w_d={w_d} but the pipeline has no domain_unet; pass domain_unet=NullTextUNet... "
                "or set w_d=0 / None."
            )
        if w_c != 0:
            terms.append(
                _Term("control", "sd", spec(w_c, "w_c"), embeds=prompt_embeds, controls=controls)
            )
        for i, g in enumerate(extra_guidance):
            if not g.name:
                g = dataclasses.replace(g, name=f"extra_{i}")
            if any(t.name == g.name for t in terms):
                raise ValueError(
                    f"guidance term name '{g.name}' is used twice; names must be unique"
                )
            if g.weight == 0:
                continue
            if weights == "fixed" and g.weight == "auto":
                raise ValueError(f"weights='fixed' but GuidanceTerm '{g.name}' has weight='auto'")
            text_free = g.model is not None and not _accepts_text(g.model)
            embeds = None
            if not text_free:
                if g.prompt_embeds is not None:
                    embeds = self._per_image(g.prompt_embeds.to(device), batch, n)
                elif g.prompt is not None:
                    embeds = self._prompt_embeds(g.prompt, batch, n, device, g.text_encoder)
                elif g.text_encoder is None:
                    embeds = prompt_embeds  # no prompt of its own: the call's prompt
                elif prompt is not None:
                    embeds = self._prompt_embeds(prompt, batch, n, device, g.text_encoder)
                else:
                    raise ValueError(
                        f"GuidanceTerm '{g.name}' has its own text_encoder but no prompt; give "
                        "it a prompt (the call's prompt_embeds come from another encoder)."
                    )
            term_controls = []
            if g.controlnet is not None:
                img = self._control_images(g.control_image, height, width, batch, n, device)
                term_controls = [Control(g.controlnet, img, g.controlnet_conditioning_scale)]
            kind = "sd" if g.model is None else "model"
            terms.append(
                _Term(g.name, kind, g.weight, g.start, g.end, embeds, g.model, term_controls)
            )
        return terms

    def _model_prediction(self, term: _Term, latent_in: torch.Tensor, t) -> torch.Tensor:
        """One forward of a model other than the frozen SD UNet (domain UNet, community UNet)."""
        model = term.model
        x = latent_in.to(model.dtype)
        if term.embeds is None:
            eps = model(x, t, return_dict=False)[0]
        else:
            chunk = Chunk(term.name, term.embeds.to(model.dtype), term.controls or [])
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

    def _sd_predictions(self, latent_in: torch.Tensor, t, chunks: list[Chunk]):
        """All frozen-SD predictions (uncond + text terms) in ONE batched UNet forward."""
        x = latent_in if len(chunks) == 1 else torch.cat([latent_in] * len(chunks))
        embeds = torch.cat([c.embeds for c in chunks])
        down, mid = chunk_residuals(x, t, chunks)
        eps = self.unet(
            x,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        return eps.chunk(len(chunks))

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
        extra_guidance: list[GuidanceTerm] | None = None,
        domain_interval: tuple[float, float] = (0.0, 1.0),
        control_interval: tuple[float, float] = (0.0, 1.0),
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> InDomainPipelineOutput | tuple:
        """Sample with ``eps_sd(z,"") + sum_i w_i (eps_i - eps_sd(z,""))`` over the active terms.

        Terms: ``domain`` (``domain_unet``, weight ``w_d``), ``control`` (frozen SD with ``prompt``
        and, if ``control_image`` is given, the pipeline's ControlNet(s); weight ``w_c``) and each
        ``extra_guidance`` term. A weight of ``None`` (or ``"auto"`` in a term) is set at the
        term's first step to ``w0 / K * |eps_sd| / |eps_i|`` per sample (K = number of terms; the
        paper's ``w0/2`` for domain + control) and held; ``weights="fixed"`` requires numbers.
        A weight of 0 drops the term and its forward pass. ``image`` + ``strength`` is SDEdit.
        ``controlnet_on_uncond=True`` also feeds the ControlNet to the unconditional prediction,
        as diffusers' ControlNet pipeline does (the paper leaves ``eps_sd(z, "")`` plain).
        """
        extra_guidance = list(extra_guidance or [])
        # 1. Check inputs
        if weights not in ("auto", "fixed"):
            raise ValueError(f"weights must be 'auto' or 'fixed', got {weights!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt (a string or list of strings) or prompt_embeds")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if image is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}"
            )
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        bad = [
            k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs
        ]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only hold 'latents', got {bad}"
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

        # 3. Encode the prompt and the unconditional (negative) prompt
        if prompt_embeds is None:
            prompt_embeds = self._prompt_embeds(prompt, batch, n, device)
        else:
            prompt_embeds = self._per_image(prompt_embeds.to(device), batch, n)
        if negative_prompt_embeds is None:
            negative = "" if negative_prompt is None else negative_prompt
            if isinstance(negative, list) and len(negative) != batch:
                raise ValueError(
                    f"negative_prompt has {len(negative)} entries but prompt has {batch}; "
                    "give one negative prompt per prompt or a single string."
                )
            negative_embeds = self._prompt_embeds(
                negative if isinstance(negative, list) else [negative] * batch, batch, n, device
            )
        else:
            negative_embeds = self._per_image(negative_prompt_embeds.to(device), batch, n)

        # 4. Resolve guidance terms (and the ControlNet images they use)
        controls = self._pipeline_controls(
            control_image, controlnet_conditioning_scale, height, width, batch, n, device
        )
        terms = self._resolve_terms(
            prompt,
            prompt_embeds,
            w_d,
            w_c,
            weights,
            controls,
            extra_guidance,
            batch,
            n,
            height,
            width,
            device,
        )
        for t_ in terms:
            interval = {"domain": domain_interval, "control": control_interval}.get(t_.name)
            if interval is not None:
                t_.start, t_.end = (float(v) for v in interval)
            is_active(0, 1, t_.start, t_.end)  # raises on a malformed interval, naming it
        uncond = Chunk("uncond", negative_embeds, controls if controlnet_on_uncond else [])

        # 5. Prepare timesteps (SDEdit keeps the last `strength` part of the schedule)
        timesteps = self._timesteps(
            num_inference_steps, None if image is None else strength, device
        )
        if len(timesteps) == 0:
            raise ValueError(
                f"strength={strength} with {num_inference_steps} steps leaves no denoising step"
            )

        # 6. Prepare latent variables: pure noise, or the noised input image for SDEdit
        dtype = prompt_embeds.dtype
        if image is not None:
            pixels = self.image_processor.preprocess(image)
            latents = self._sdedit_latents(
                pixels, timesteps[:1].repeat(rows), rows, dtype, device, generator
            )
        else:
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
            latents = latents * self.scheduler.init_noise_sigma

        # 7. Prepare extra step kwargs
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        # 8. Denoising loop
        held: dict[str, float | torch.Tensor] = {}
        num_steps = len(timesteps)
        with self.progress_bar(total=num_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                # 8.1 Terms active at this step (outside its interval a term drops out)
                active = [x for x in terms if is_active(i, num_steps, x.start, x.end)]
                latent_in = self.scheduler.scale_model_input(latents, t)

                # 8.2 Frozen SD: uncond + every SD text term, in one batched forward
                sd_chunks = [uncond] + [
                    Chunk(x.name, x.embeds, x.controls or []) for x in active if x.kind == "sd"
                ]
                eps_sd = self._sd_predictions(latent_in, t, sd_chunks)
                eps_0 = eps_sd[0]
                preds = {c.name: e for c, e in zip(sd_chunks[1:], eps_sd[1:], strict=True)}

                # 8.3 Domain UNet and other models: one forward each
                for x in active:
                    if x.kind != "sd":
                        preds[x.name] = self._model_prediction(x, latent_in, t)

                # 8.4 Weights: fixed, or auto at the term's first active step, then held
                for x in active:
                    if x.name not in held:
                        held[x.name] = (
                            auto_weight(eps_0, preds[x.name], w0, num_terms=len(terms)).to(
                                eps_0.device
                            )
                            if x.weight == "auto"
                            else x.weight
                        )

                # 8.5 Combine: eps_0 + sum_i w_i (eps_i - eps_0)
                noise_pred = multi_guidance(
                    eps_0, [preds[x.name] for x in active], [held[x.name] for x in active]
                )

                # 8.6 Compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(
                    noise_pred, t, latents, **step_kwargs, return_dict=False
                )[0]

                # 8.7 Step-end callback may replace the latents
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = out.pop("latents", latents)
                progress_bar.update()

        # 9. Decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(
                latents / self.vae.config.scaling_factor, return_dict=False, generator=generator
            )[0]
            images = self.image_processor.postprocess(
                decoded, output_type=output_type, do_denormalize=[True] * decoded.shape[0]
            )
        self.maybe_free_model_hooks()

        used = {
            x.name: (
                held[x.name].float().cpu()
                if isinstance(held.get(x.name), torch.Tensor)
                else torch.full((rows,), float(held.get(x.name, 0.0)))
            )
            for x in terms
        }
        if not return_dict:
            return images, used
        return InDomainPipelineOutput(images=images, guidance_weights=used)
