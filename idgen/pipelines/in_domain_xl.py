"""InDomainXLPipeline: guidance-decoupled multi-guidance sampling on a frozen SDXL (paper §3.2).

    eps = eps_sd(z, "") + sum_i w_i (eps_i(z, c_i) - eps_sd(z, ""))        (paper Eq. 3)

as :class:`~idgen.pipelines.InDomainPipeline` does for SD1.5, with SDXL's conditioning: every
frozen-SDXL prediction gets ``(prompt_embeds, pooled)`` and the size ``time_ids``; the
unconditional branch is exactly what ``StableDiffusionXLPipeline`` uses (all zeros with
``force_zeros_for_empty_prompt``, else the negative prompt); the null-text domain UNet gets
the same ``time_ids``. Prompt encoding, time ids, latents, SDEdit's timesteps and latents are
diffusers' own methods, so at ``w_d = 0, w_c = g, weights="fixed"`` this is
``StableDiffusionXLPipeline(guidance_scale=g)`` (and ``StableDiffusionXLImg2ImgPipeline`` for
SDEdit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from idgen.guidance import CONTROL, GuidanceTerm, Guider
from idgen.models.text import accepts_text
from idgen.pipelines.diffusers_call import (
    CheckedLoraMixin,
    DiffusersCallMixin,
    extra_step_kwargs,
    replaced_rows,
    rescale_guided,
    resolve_guidance_scale,
)
from idgen.pipelines.in_domain import (
    InDomainPipeline,
    InDomainPipelineOutput,
    WeightMode,
    make_scheduler,
)


@dataclass
class _XLRun:
    """What one term runs: its model (None: the frozen SDXL) and, for text models, its rows."""

    model: Any
    embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    controlled: bool = False  # the call's control image drives the pipeline's ControlNet here


class InDomainXLPipeline(CheckedLoraMixin, DiffusersCallMixin, StableDiffusionXLPipeline):
    """Frozen SDXL + optional null-text SDXL domain UNet, multi-guidance sampling.

    Components: SDXL's (``vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet,
    scheduler``) plus ``domain_unet`` (called as ``domain_unet(latents, t, time_ids=...)``, e.g.
    an SDXL ``NullTextUNet``; optional) and ``controlnet`` (an SDXL ``ControlNetModel``, on the
    control term; optional). ``InDomainXLPipeline.from_pipe(sdxl_pipe, domain_unet=...)``
    shares an SDXL pipeline's models. The call takes the guidance arguments
    of :class:`~idgen.pipelines.InDomainPipeline` and SDXL's size conditioning.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->controlnet->unet->domain_unet->vae"
    _optional_components = [
        *StableDiffusionXLPipeline._optional_components,
        "domain_unet",
        "controlnet",
    ]
    # What callback_on_step_end may ask for: diffusers' SDXL names (the control term's text rows
    # ``prompt_embeds`` / ``add_text_embeds`` and the conditional ``add_time_ids``, which the
    # domain UNet gets too; SDXL hands them over concatenated with the unconditional rows, we
    # hand over the conditional rows, replaceable from the next step on, so diffusers'
    # SDXLCFGCutoffCallback works), then InDomainPipeline's.
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
        "noise_pred",
        "eps_uncond",
        "guidance_preds",
        "guidance_weights",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False,
        domain_unet: Any = None,
        controlnet: ControlNetModel = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(domain_unet=domain_unet, controlnet=controlnet)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @classmethod
    def from_sd(
        cls,
        sd: StableDiffusionXLPipeline,
        domain_unet: Any = None,
        controlnet: Any = None,
        scheduler: str | Any = "dpm++",
    ) -> InDomainXLPipeline:
        """Wrap a loaded SDXL pipeline's components; ``scheduler`` defaults to DPM-Solver++."""
        if isinstance(controlnet, list | tuple):
            raise ValueError(
                "several ControlNets are not implemented for SDXL bases yet; give one "
                "(sampler.controlnet=<folder>)."
            )
        if isinstance(scheduler, str):
            scheduler = make_scheduler(sd.scheduler.config, scheduler)
        keep = ("scheduler", "domain_unet", "controlnet")
        parts = {k: v for k, v in sd.components.items() if k not in keep}
        pipe = cls(
            **parts,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=sd.config.get("force_zeros_for_empty_prompt", True),
            domain_unet=domain_unet,
            controlnet=controlnet,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ----------------------------------------------------------------------------- call steps

    def _check_call(
        self,
        prompt: Any,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any,
        weights: str,
        num_inference_steps: int,
        image: Any,
        strength: float,
        height: int,
        width: int,
        tensor_inputs: list[str],
        control_image: Any,
    ) -> None:
        """Raise on bad call arguments before any model runs."""
        if weights not in get_args(WeightMode):
            raise ValueError(f"weights must be 'auto' or 'fixed', got {weights!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt (a string or list of strings) or prompt_embeds")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(
                "SDXL needs pooled_prompt_embeds with prompt_embeds (text_encoder_2's pooled "
                "output, as StableDiffusionXLPipeline.encode_prompt returns it)"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if image is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}"
            )
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
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

    def _term_run(
        self,
        term: GuidanceTerm,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        rows: int,
        device: torch.device,
    ) -> _XLRun:
        """A term's model and, for text models, its ``(prompt_embeds, pooled)`` rows."""
        model = getattr(self, term.model) if isinstance(term.model, str) else term.model
        if term.controlnet is not None or term.text_encoder is not None:
            raise ValueError(
                f"GuidanceTerm '{term.name}': a ControlNet or text encoder of its own is not "
                "implemented for SDXL terms yet; give the term a prompt and/or a UNet."
            )
        if model is not None and not accepts_text(model):
            return _XLRun(model)
        # the call's control image drives the pipeline's ControlNet in the "control" term
        controlled = term.name == CONTROL and model is None
        if term.prompt_embeds is not None:
            raise ValueError(
                f"GuidanceTerm '{term.name}': SDXL terms take prompt=... (prompt_embeds alone "
                "lack SDXL's pooled embedding)."
            )
        if term.prompt is None:
            return _XLRun(model, embeds, pooled, controlled)  # the call's prompt
        texts = [term.prompt] if isinstance(term.prompt, str) else list(term.prompt)
        own, _, own_pooled, _ = self.encode_prompt(
            texts,
            device=device,
            num_images_per_prompt=rows // len(texts),
            do_classifier_free_guidance=False,
            lora_scale=self._lora_scale_of_call,
            clip_skip=self.clip_skip,
        )
        return _XLRun(model, own, own_pooled, controlled)

    def _timesteps(
        self,
        num_inference_steps: int,
        image: Any,
        strength: float,
        device: torch.device,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
    ) -> torch.Tensor:
        """The schedule as diffusers' SDXL txt2img (begin index 0) or img2img (last
        ``strength`` part) pipeline makes it."""
        steps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        if image is not None:
            steps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(
                self, num_inference_steps, strength, device
            )
        elif hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        if len(steps) == 0:
            raise ValueError(
                f"strength={strength} with {num_inference_steps} steps leaves no denoising step"
            )
        return steps

    def _sd_predictions(self, latent_in, t, chunks: list[tuple[Any, ...]], control=None):
        """Frozen-SDXL predictions of ``chunks`` (``(embeds, pooled, time_ids, controlled)``
        each) in ONE batched forward, as diffusers batches ``[uncond; cond]``; the ControlNet
        (``control``: ``(image, scale)``) runs once over the controlled chunks, the others get
        zero residuals."""
        n = len(chunks)
        x = latent_in if n == 1 else torch.cat([latent_in] * n)
        embeds, pooled, time_ids = (
            torch.cat(parts) for parts in list(zip(*chunks, strict=True))[:3]
        )
        added = {"text_embeds": pooled, "time_ids": time_ids}
        residuals = {}
        rows = latent_in.shape[0]
        on = [k for k, chunk in enumerate(chunks) if chunk[3]]
        if control is not None and on:
            idx = torch.cat([torch.arange(k * rows, (k + 1) * rows) for k in on]).to(x.device)
            every = len(on) == n  # diffusers' CFG batch: no gather/scatter, same arithmetic
            image, scale = control
            down, mid = self.controlnet(
                x if every else x[idx],
                t,
                encoder_hidden_states=embeds if every else embeds[idx],
                controlnet_cond=torch.cat([image] * len(on)),
                conditioning_scale=scale,
                added_cond_kwargs=added if every else {k: v[idx] for k, v in added.items()},
                return_dict=False,
            )
            if not every:
                down = [_scatter(r, idx, x.shape[0]) for r in down]
                mid = _scatter(mid, idx, x.shape[0])
            residuals = {
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }
        eps = self.unet(
            x,
            t,
            encoder_hidden_states=embeds,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]
        return eps.chunk(n)

    def _model_prediction(self, run: _XLRun, latent_in, t, time_ids) -> torch.Tensor:
        """One forward of a model other than the frozen SDXL UNet (domain UNet, another UNet)."""
        model = run.model
        x = latent_in.to(model.dtype)
        if run.embeds is None:
            eps = model(x, t, time_ids=time_ids, return_dict=False)[0]
        else:
            added = {"text_embeds": run.pooled.to(model.dtype), "time_ids": time_ids}
            eps = model(
                x,
                t,
                encoder_hidden_states=run.embeds.to(model.dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
        return eps.to(latent_in.dtype)

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """VAE decode and postprocess as ``StableDiffusionXLPipeline`` (fp16 VAE upcast,
        ``latents_mean``/``latents_std`` when the VAE config has them)."""
        if output_type == "latent":
            return latents
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and config.latents_std is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return self.image_processor.postprocess(image, output_type=output_type)

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
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        controlnet_on_uncond: bool = False,
        image: Any = None,
        strength: float = 0.3,
        extra_guidance: Sequence[GuidanceTerm] | None = None,
        domain_interval: Sequence[float] = (0.0, 1.0),
        control_interval: Sequence[float] = (0.0, 1.0),
        guidance: Sequence[GuidanceTerm] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
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
    ) -> InDomainPipelineOutput | tuple:
        """Sample with ``eps_sd(z,"") + sum_i w_i (eps_i - eps_sd(z,""))`` over the active terms.

        The guidance arguments are :meth:`InDomainPipeline.__call__`'s (``w_d``, ``w_c``, ``w0``,
        ``weights``, ``guidance``, ``extra_guidance``, intervals; ``guidance_scale`` is ``w_c``
        in diffusers' units, ``guidance_rescale`` toward the control term's prediction). SDXL's
        own: ``prompt_2`` / ``negative_prompt_2``, ``pooled_prompt_embeds`` and the size
        conditioning (``original_size``, ``crops_coords_top_left``, ``target_size`` and their
        ``negative_*``), which the domain UNet gets too. ``image`` + ``strength`` is SDEdit, as
        ``StableDiffusionXLImg2ImgPipeline``. ControlNet is not implemented for SDXL yet.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        w_c = resolve_guidance_scale(guidance_scale, w_c)

        # 0. Default height and width to the UNet's (with a control image: to its size, as
        #    diffusers' SDXL ControlNet pipeline)
        requested = (height, width)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self._check_call(
            prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            weights,
            num_inference_steps,
            image,
            strength,
            height,
            width,
            tensor_inputs,
            control_image,
        )
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
        rows = batch * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != rows:
            raise ValueError(
                f"got {len(generator)} generators for {rows} images (prompts x "
                "num_images_per_prompt); pass one generator per image or a single one."
            )
        device = self._execution_device

        # 3. Encode the prompt and the unconditional branch exactly as diffusers' SDXL does
        #    (zeros with force_zeros_for_empty_prompt and no negative prompt)
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=self._lora_scale_of_call,
            clip_skip=self.clip_skip,
        )

        # 4. Guidance terms (InDomainPipeline's rules: one list, named, weight-0 dropped)
        terms = InDomainPipeline._guidance_terms(
            self,
            guidance,
            w_d,
            w_c,
            domain_interval,
            control_interval,
            list(extra_guidance or []),
            weights,
        )
        runs = {g.name: self._term_run(g, embeds, pooled, rows, device) for g in terms}

        # 5. Prepare timesteps (SDEdit: the last `strength` part, as SDXL img2img)
        steps = self._timesteps(num_inference_steps, image, strength, device, timesteps, sigmas)
        guider = Guider(terms, num_steps=len(steps), w0=w0)
        self._num_timesteps = len(steps)

        # 6. The control image as diffusers' SDXL ControlNet pipeline prepares it (its size is the
        #    output's), then the latents: SDXL txt2img noise, or img2img's noised image
        control = None
        if control_image is not None:
            cimage = self.control_image_processor.preprocess(
                control_image, height=requested[0], width=requested[1]
            ).to(dtype=torch.float32)
            repeat = rows if cimage.shape[0] == 1 else num_images_per_prompt
            cimage = cimage.repeat_interleave(repeat, dim=0).to(device, embeds.dtype)
            height, width = cimage.shape[-2:]
            control = (cimage, float(controlnet_conditioning_scale))
        if image is not None:
            pixels = self.image_processor.preprocess(image)
            latents = StableDiffusionXLImg2ImgPipeline.prepare_latents(
                self, pixels, steps[:1].repeat(rows), batch, num_images_per_prompt,
                embeds.dtype, device, generator,
            )  # fmt: skip
            height, width = (s * self.vae_scale_factor for s in latents.shape[-2:])
        else:
            latents = self.prepare_latents(
                rows,
                self.unet.config.in_channels,
                height,
                width,
                embeds.dtype,
                device,
                generator,
                latents,
            )

        # 7. Size conditioning (time_ids) of the conditional and unconditional rows
        projection = int(pooled.shape[-1])
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, embeds.dtype, projection
        )
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                embeds.dtype,
                projection,
            )
        time_ids = time_ids.to(device).repeat(rows, 1)
        negative_time_ids = negative_time_ids.to(device).repeat(rows, 1)
        uncond = (negative_embeds, negative_pooled, negative_time_ids, controlnet_on_uncond)
        step_kwargs = extra_step_kwargs(self.scheduler, generator, eta)

        # 8. Denoising loop
        with self.progress_bar(total=len(steps)) as progress_bar:
            for i, t in enumerate(steps):
                if self.interrupt:
                    continue
                # 8.1 Terms that need a prediction now (active, and not reusing an earlier one)
                fresh = guider.to_predict(i)
                latent_in = self.scheduler.scale_model_input(latents, t)

                # 8.2 Frozen SDXL: uncond + every SDXL text term, in one batched forward
                sd_terms = [g.name for g in fresh if runs[g.name].model is None]
                chunks = [uncond] + [
                    (runs[name].embeds, runs[name].pooled, time_ids, runs[name].controlled)
                    for name in sd_terms
                ]
                eps_uncond, *eps_text = self._sd_predictions(latent_in, t, chunks, control)
                preds = dict(zip(sd_terms, eps_text, strict=True))

                # 8.3 Domain UNet and other models (the same time_ids): one forward each
                for g in fresh:
                    if runs[g.name].model is not None:
                        preds[g.name] = self._model_prediction(runs[g.name], latent_in, t, time_ids)

                # 8.4 Combine: eps_0 + sum_i w_i (eps_i - eps_0); guidance_rescale as diffusers
                noise_pred = guider.combine(i, eps_uncond, preds)
                self._sync_guidance_scale(guider)
                # rescale first: do_classifier_free_guidance reads a weight tensor (a host sync)
                if self.guidance_rescale > 0.0 and self.do_classifier_free_guidance:
                    reference = preds.get(CONTROL, next(iter(preds.values()), None))
                    noise_pred = rescale_guided(noise_pred, reference, self.guidance_rescale)

                # 8.5 x_t -> x_t-1
                latents = self.scheduler.step(
                    noise_pred, t, latents, **step_kwargs, return_dict=False
                )[0]

                # 8.6 Step-end callback (may replace the latents, change weights)
                if callback_on_step_end is not None:
                    control_run = runs.get(CONTROL)
                    on_sd = control_run is not None and control_run.model is None
                    available = {
                        "latents": latents,
                        "prompt_embeds": control_run.embeds if on_sd else None,
                        "add_text_embeds": control_run.pooled if on_sd else None,
                        "add_time_ids": time_ids,
                        "noise_pred": noise_pred,
                        "eps_uncond": eps_uncond,
                        "guidance_preds": preds,
                        "guidance_weights": {
                            g.name: guider.weights[g.name] for g in guider.active(i)
                        },
                    }
                    scale_before = self._guidance_scale
                    out = dict(
                        callback_on_step_end(self, i, t, {k: available[k] for k in tensor_inputs})
                    )
                    latents = out.pop("latents", latents)
                    new_ids = replaced_rows(out, "add_time_ids", time_ids, rows, i)
                    time_ids = time_ids if new_ids is None else new_ids
                    for key, field in (("prompt_embeds", "embeds"), ("add_text_embeds", "pooled")):
                        new = replaced_rows(out, key, available[key], rows, i)
                        if new is not None and not on_sd:
                            raise ValueError(
                                f"callback_on_step_end returned {key}, but this run's control "
                                "term does not run on the frozen SDXL (w_c=0 or a model of its own)."
                            )
                        if new is not None:
                            setattr(control_run, field, new)
                    self._apply_callback_weights(guider, i, scale_before, out)
                progress_bar.update()

        # 9. Decode
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        used = guider.used_weights(rows)
        if not return_dict:
            return images, used
        return InDomainPipelineOutput(images=images, guidance_weights=used)


def _scatter(rows: torch.Tensor, idx: torch.Tensor, total: int) -> torch.Tensor:
    """``rows`` placed at ``idx`` of a zero batch of ``total`` rows (x + 0 leaves the other
    chunks' UNet features untouched)."""
    out = torch.zeros((total, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return out.index_copy(0, idx, rows)
