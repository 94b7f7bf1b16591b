"""InDomainSD3Pipeline: guidance-decoupled sampling on SD3 / SD3.5, in velocity space.

SD3's transformer predicts a velocity ``v`` (flow matching) instead of the noise ``eps``;
classifier-free guidance mixes velocities exactly as it mixes noise predictions, so the paper's
Eq. 3 carries over term for term::

    v = v_sd(z_t, "") + sum_i w_i (v_i - v_sd(z_t, ""))

with the same :class:`~idgen.guidance.GuidanceTerm` list and :class:`~idgen.guidance.Guider`
(intervals, ``reuse_every``, automatic weights ``w0 / K * |v_sd| / |v_i|``, now norms of
velocities). At ``w_d = 0`` the images are ``StableDiffusion3Pipeline``'s with
``guidance_scale = w_c``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    retrieve_latents,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from idgen.guidance import GuidanceTerm, Guider
from idgen.models.text import accepts_text
from idgen.pipelines.diffusers_call import (
    CheckedLoraMixin,
    DiffusersCallMixin,
    replaced_rows,
    resolve_guidance_scale,
)
from idgen.pipelines.in_domain import InDomainPipeline, InDomainPipelineOutput, WeightMode


@dataclass
class _Text:
    """A term's text rows for the transformer: joint tokens and the pooled vector."""

    embeds: torch.Tensor
    pooled: torch.Tensor


class InDomainSD3Pipeline(CheckedLoraMixin, DiffusersCallMixin, StableDiffusion3Pipeline):
    """Frozen SD3 + optional text-free domain transformer, multi-guidance sampling.

    Components: ``StableDiffusion3Pipeline``'s (``transformer``, ``scheduler``, ``vae``, the two
    CLIPs and optional T5) plus ``domain_transformer`` (a text-free model called as
    ``model(latents, t).sample``, e.g. :class:`~idgen.models.NullTextSD3Transformer`; optional;
    also reachable as ``domain_unet``, the name the ``domain`` guidance term uses).
    ``InDomainSD3Pipeline.from_pipe(sd3_pipe, domain_transformer=...)`` shares ``sd3_pipe``'s
    models. ``image`` + ``strength`` is img2img (``StableDiffusion3Img2ImgPipeline``'s).
    """

    model_cpu_offload_seq = (
        "text_encoder->text_encoder_2->text_encoder_3->transformer->domain_transformer->vae"
    )
    _optional_components = [
        *StableDiffusion3Pipeline._optional_components,
        "domain_transformer",
    ]
    # InDomainPipeline's names (one contract for callbacks such as the sampling trace):
    # ``eps_uncond`` is the unconditional prediction, here the velocity v_sd(z, "").
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "noise_pred",
        "eps_uncond",
        "guidance_preds",
        "guidance_weights",
    ]

    def __init__(
        self,
        # diffusers' from_pipe matches components by these annotations (SD3's own)
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        domain_transformer: Any = None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(domain_transformer=domain_transformer)

    @classmethod
    def from_sd(
        cls,
        sd: StableDiffusion3Pipeline,
        domain_unet: Any = None,
        controlnet: Any = None,
        scheduler: str | Any = "dpm++",
    ) -> "InDomainSD3Pipeline":
        """Wrap a loaded SD3 pipeline (``InDomainPipeline.from_sd``'s arguments).

        ``scheduler``: a scheduler object, or a name; SD3 samples its flow with its own
        ``FlowMatchEulerDiscreteScheduler``, which ``"dpm++"`` (the SD1.5 paper's default) and
        ``"FlowMatchEulerDiscreteScheduler"`` keep. ControlNet is not implemented for SD3.
        """
        if controlnet is not None:
            raise ValueError(
                "ControlNet guidance is not implemented for SD3 bases (diffusers' SD3 ControlNet "
                "is a different model); drop the controlnet for model=sd3."
            )
        if isinstance(scheduler, str):
            if scheduler not in ("dpm++", "dpmsolver++", type(sd.scheduler).__name__):
                raise ValueError(
                    f"scheduler={scheduler!r}: SD3 samples with its flow-matching scheduler "
                    f"({type(sd.scheduler).__name__}); use that name or 'dpm++' (kept as it)."
                )
            scheduler = type(sd.scheduler).from_config(sd.scheduler.config)
        pipe = cls.from_pipe(sd, scheduler=scheduler, domain_transformer=domain_unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def domain_unet(self) -> Any:
        """The domain model under the name guidance terms use (``GuidanceTerm(model="domain_unet")``)."""
        return self.domain_transformer

    # ----------------------------------------------------------------------------- call steps

    def _encode(self, prompt, prompt_2, prompt_3, rows_per_prompt, device, max_len) -> _Text:
        embeds, _, pooled, _ = self.encode_prompt(
            prompt,
            prompt_2,
            prompt_3,
            device=device,
            num_images_per_prompt=rows_per_prompt,
            do_classifier_free_guidance=False,
            clip_skip=self.clip_skip,
            max_sequence_length=max_len,
            lora_scale=self._lora_scale_of_call,
        )
        return _Text(embeds, pooled)

    def _mu(self, latent_h: int, latent_w: int) -> float | None:
        """The shift of ``use_dynamic_shifting`` schedulers, from the image size (as diffusers)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return None
        patch = self.transformer.config.patch_size
        return calculate_shift(
            (latent_h // patch) * (latent_w // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )

    def _img2img_latents(self, image, timestep, rows, dtype, device, generator) -> torch.Tensor:
        """``StableDiffusion3Img2ImgPipeline.prepare_latents``: encode, shift/scale, noise to
        ``timestep`` with the scheduler's ``scale_noise`` (same generator draws)."""
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, list):
            init = torch.cat(
                [
                    retrieve_latents(self.vae.encode(image[i : i + 1]), generator=generator[i])
                    for i in range(rows)
                ]
            )
        else:
            init = retrieve_latents(self.vae.encode(image), generator=generator)
        init = (init - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        if rows > init.shape[0]:
            if rows % init.shape[0]:
                raise ValueError(f"cannot repeat {init.shape[0]} input images to {rows} rows")
            init = torch.cat([init] * (rows // init.shape[0]))
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.scale_noise(init, timestep, noise).to(device=device, dtype=dtype)

    def _term_text(
        self, term, model, call_text: "_Text", rows_per_prompt, device, max_len
    ) -> "_Text | None":
        """The text rows a term's model takes (None: a text-free model such as the domain one)."""
        if model is not None and not accepts_text(model):
            return None
        if term.prompt_embeds is not None:
            raise ValueError(
                f"GuidanceTerm '{term.name}': prompt_embeds alone cannot drive SD3 (it also needs "
                "the pooled embedding); give the term a prompt."
            )
        if term.prompt is None:
            return call_text
        return self._encode(term.prompt, None, None, rows_per_prompt, device, max_len)

    def _predict(self, model, latents, t, text: _Text | None) -> torch.Tensor:
        timestep = t.expand(latents.shape[0])
        if text is None:
            return model(latents.to(model.dtype), timestep, return_dict=False)[0].to(latents.dtype)
        return model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text.embeds,
            pooled_projections=text.pooled,
            joint_attention_kwargs=self._joint_attention_kwargs,
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        w_d: float | None = None,
        w_c: float | None = None,
        w0: float = 7.0,
        weights: WeightMode = "auto",
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        image: Any = None,
        strength: float = 0.6,
        extra_guidance: Sequence[GuidanceTerm] | None = None,
        domain_interval: Sequence[float] = (0.0, 1.0),
        control_interval: Sequence[float] = (0.0, 1.0),
        guidance: Sequence[GuidanceTerm] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_scale: float | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        mu: float | None = None,
        max_sequence_length: int = 256,
        callback_on_step_end: Callable[..., dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        controlnet_on_uncond: bool = False,
    ) -> InDomainPipelineOutput | tuple:
        """Sample with ``v_sd(z,"") + sum_i w_i (v_i - v_sd(z,""))`` over the active terms.

        The terms and weights are :class:`~idgen.pipelines.InDomainPipeline`'s (``w_d``,
        ``w_c``, ``guidance=[...]``, ``extra_guidance``, intervals, ``weights="auto"|"fixed"``,
        ``w0``); ``guidance_scale`` is ``w_c`` in diffusers' units. The other arguments have
        ``StableDiffusion3Pipeline``'s meaning (``prompt_2``/``prompt_3`` for CLIP-G and T5,
        ``sigmas``, ``mu`` for dynamic shifting, ``max_sequence_length``, ``clip_skip``,
        ``joint_attention_kwargs``); ``image`` + ``strength`` is
        ``StableDiffusion3Img2ImgPipeline``'s img2img. A step-end callback may change
        ``latents`` and the weights (``pipeline._guidance_scale``, or return
        ``guidance_weights``), or set ``pipeline._interrupt``. ``control_image`` (ControlNet) is
        not implemented for SD3: given, it raises; the ControlNet scale arguments are accepted
        for the one settings-to-call mapping of idgen-sample and otherwise unused.
        """
        if control_image is not None:
            raise ValueError("control_image: ControlNet guidance is not implemented for SD3.")
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        names = callback_on_step_end_tensor_inputs or ["latents"]
        bad = [k for k in names if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only hold {self._callback_tensor_inputs}, "
                f"got {bad}"
            )
        w_c = resolve_guidance_scale(guidance_scale, w_c)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if weights not in ("auto", "fixed"):
            raise ValueError(f"weights must be 'auto' or 'fixed', got {weights!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt (a string or list of strings) or prompt_embeds")
        multiple = self.vae_scale_factor * self.patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple}, got {height}x{width}"
            )
        if image is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        # joint_attention_kwargs' LoRA "scale" reaches the text encoders as in diffusers' SD3
        self._start_call(
            guidance_scale if guidance_scale is not None else w_c,
            0.0,
            clip_skip,
            joint_attention_kwargs,
        )
        self._joint_attention_kwargs = joint_attention_kwargs

        # 1. Call parameters
        if prompt_embeds is not None:
            batch = prompt_embeds.shape[0]
        else:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        n = num_images_per_prompt
        rows = batch * n
        device = self._execution_device

        # 2. Encode the prompt and the unconditional prompt ("" unless negative_prompt), as
        #    StableDiffusion3Pipeline.encode_prompt does for classifier-free guidance
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt,
            prompt_2,
            prompt_3,
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=self.clip_skip,
            max_sequence_length=max_sequence_length,
            lora_scale=self._lora_scale_of_call,
        )
        call_text, uncond = _Text(embeds, pooled), _Text(neg_embeds, neg_pooled)

        # 3. Guidance terms (InDomainPipeline's rules) and what each runs
        if guidance is None and w_d not in (None, 0) and self.domain_transformer is None:
            raise ValueError(
                "w_d: the pipeline has no domain_transformer; pass domain_transformer="
                "NullTextSD3Transformer... when building it or set w_d=0 / None."
            )
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
        models, texts = {}, {}
        for g in terms:
            model = getattr(self, g.model) if isinstance(g.model, str) else g.model
            models[g.name] = model
            texts[g.name] = self._term_text(g, model, call_text, n, device, max_sequence_length)

        # 4. Timesteps (dynamic shifting from the latent size; img2img keeps the last part)
        latent_h, latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        if mu is None:
            mu = self._mu(latent_h, latent_w)
        scheduler_kwargs = {} if mu is None else {"mu": mu}
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        if image is not None:
            init_steps = min(num_inference_steps * strength, num_inference_steps)
            t_start = int(max(num_inference_steps - init_steps, 0))
            timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(t_start * self.scheduler.order)
        if len(timesteps) == 0:
            raise ValueError(
                f"strength={strength} with {num_inference_steps} steps leaves no denoising step"
            )
        guider = Guider(terms, num_steps=len(timesteps), w0=w0)
        self._num_timesteps = len(timesteps)

        # 5. Starting latents: noise, or the noised input image (img2img)
        dtype = embeds.dtype
        if image is not None and latents is None:
            pixels = self.image_processor.preprocess(image, height=height, width=width)
            latents = self._img2img_latents(
                pixels, timesteps[:1].repeat(rows), rows, dtype, device, generator
            )
        else:
            latents = self.prepare_latents(
                rows,
                self.transformer.config.in_channels,
                height,
                width,
                dtype,
                device,
                generator,
                latents,
            )

        # 6. Denoising loop
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                fresh = guider.to_predict(i)
                # 6.1 Frozen SD3 on the call's text: uncond + control in ONE batched forward,
                #     in diffusers' order ([negative; positive]); other text terms after them
                sd_terms = [g.name for g in fresh if models[g.name] is None]
                chunks = [uncond] + [texts[name] for name in sd_terms]
                x = latents if len(chunks) == 1 else torch.cat([latents] * len(chunks))
                batched = _Text(
                    torch.cat([c.embeds for c in chunks]), torch.cat([c.pooled for c in chunks])
                )
                v_uncond, *v_text = self._predict(self.transformer, x, t, batched).chunk(
                    len(chunks)
                )
                preds = dict(zip(sd_terms, v_text, strict=True))
                # 6.2 Domain transformer and other models: one forward each
                for g in fresh:
                    if models[g.name] is not None:
                        preds[g.name] = self._predict(models[g.name], latents, t, texts[g.name])
                # 6.3 v_0 + sum_i w_i (v_i - v_0), weights held by the guider
                noise_pred = guider.combine(i, v_uncond, preds)
                self._sync_guidance_scale(guider)
                # 6.4 Euler step of the flow
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                # 6.5 Step-end callback (may replace latents, change weights)
                if callback_on_step_end is not None:
                    scale_before = self._guidance_scale
                    available = {
                        "latents": latents,
                        "prompt_embeds": call_text.embeds,
                        "pooled_prompt_embeds": call_text.pooled,
                        "noise_pred": noise_pred,
                        "eps_uncond": v_uncond,
                        "guidance_preds": preds,
                        "guidance_weights": {
                            g.name: guider.weights[g.name] for g in guider.active(i)
                        },
                    }
                    outputs = callback_on_step_end(self, i, t, {k: available[k] for k in names})
                    outputs = dict(outputs or {})
                    latents = outputs.pop("latents", latents)
                    # the call's text rows (diffusers' SD3CFGCutoffCallback hands them back)
                    for key, field in (
                        ("prompt_embeds", "embeds"),
                        ("pooled_prompt_embeds", "pooled"),
                    ):
                        new = replaced_rows(outputs, key, available[key], rows, i)
                        if new is not None:
                            setattr(call_text, field, new)
                    self._apply_callback_weights(guider, i, scale_before, outputs)
                progress_bar.update()

        # 7. Decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(
                latents / self.vae.config.scaling_factor + self.vae.config.shift_factor,
                return_dict=False,
            )[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()

        used = guider.used_weights(rows)
        if not return_dict:
            return images, used
        return InDomainPipelineOutput(images=images, guidance_weights=used)
