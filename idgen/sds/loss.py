"""Score distillation (DreamFusion's SDS) with the guidance-decoupled noise prediction (paper §4.3).

For a differentiable render ``x = g(theta)`` encoded to ``z`` (or latents rendered directly),
a timestep ``t`` and noise ``eps``, ``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` and

    eps_hat(z_t) = eps_sd(z_t, "") + sum_i w_i (eps_i(z_t, c_i) - eps_sd(z_t, ""))     (Eq. 3)
    grad         = w(t) (eps_hat(z_t) - eps)

with the terms of sampling: the domain model (``w_d``), the frozen SD with the prompt (``w_c``,
optionally through a ControlNet) and any extra ``GuidanceTerm``. The loss is written as
``0.5 ||z - (z - grad).detach()||^2`` summed over each view and averaged over the batch, so
``d loss / d z_i = grad_i / B`` while no gradient flows through the UNets. ``w_d = 0`` is
standard SDS with classifier-free guidance of scale ``w_c``.

``target="image"`` (for pixel renders) moves the same step into image space instead of
back-propagating it through the VAE encoder: with the one-step estimate
``z0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)`` (so that
``eps_hat - eps = sqrt(a_t / (1 - a_t)) (z - z0_hat)``), ``grad = w(t) (x - D(z0_hat))`` on the
pixels ``x`` (HiFA's image-space SDS). A small VAE's encoder Jacobian turns latent SDS into
high-frequency pixel noise (measured on the toy world's 242k-parameter VAE); the image-space
form has no encoder in the backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from idgen.guidance import (
    CONTROL,
    DOMAIN,
    GuidanceTerm,
    auto_weight,
    decoupled_terms,
    is_active,
    multi_guidance,
)
from idgen.models.family import family_of
from idgen.models.text import accepts_text, encode_text
from idgen.sds.schedule import TimestepSchedule, Weighting, sds_weight


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 ||z - (z - grad).detach()||^2`` per view, averaged over the batch.

    Its gradient with respect to ``latents[i]`` is ``grad[i] / B``: the optimiser sees the SDS
    direction without back-propagating through the diffusion model.
    """
    if latents.shape != grad.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and grad {tuple(grad.shape)} differ")
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents.float(), target.float(), reduction="sum") / latents.shape[0]


def to_epsilon(
    pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """A model output of ``prediction_type`` as the noise prediction ``eps`` (float32)."""
    a = alpha_bar.float().view(-1, *([1] * (z_t.ndim - 1)))
    pred, z_t = pred.float(), z_t.float()
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a.sqrt() * pred + (1 - a).sqrt() * z_t
    if prediction_type == "sample":
        return (z_t - a.sqrt() * pred) / (1 - a).sqrt()
    raise ValueError(
        f"scheduler prediction_type {prediction_type!r} is not supported: use 'epsilon', "
        "'v_prediction' or 'sample'"
    )


@dataclass
class SDSOutput:
    """One SDS evaluation: the loss to back-propagate and what made it (all detached but loss)."""

    loss: torch.Tensor
    timesteps: torch.Tensor  # [B] integer timesteps used
    grad: torch.Tensor  # w(t) (eps_hat - eps) [B, C, h, w]; target="image": on pixels [B, 3, H, W]
    noise_pred: torch.Tensor  # eps_hat, [B, C, h, w]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # per-view weight of each term


def _weight_arg(w: float | str | None) -> float | None:
    """A ``w_d`` / ``w_c`` as :func:`decoupled_terms` takes it (a config may spell ``"auto"``)."""
    return None if w == "auto" else w


def _check_interval(arg: str, interval: Sequence[float]) -> None:
    """Raise, naming ``arg``, unless ``interval`` is ``(start, end)`` with 0 <= start <= end <= 1."""
    start, end = (float(v) for v in interval)
    try:
        is_active(0, 1, start, end)
    except ValueError as err:
        # GuidanceTerm would refuse it too, but without saying which argument is wrong.
        raise ValueError(f"{arg}: {err}") from None


def sds_terms(
    domain_model: Any,
    w_d: float | None,
    w_c: float | None,
    domain_interval: Sequence[float] = (0.0, 1.0),
    control_interval: Sequence[float] = (0.0, 1.0),
    extra_guidance: Sequence[GuidanceTerm] = (),
) -> list[GuidanceTerm]:
    """The SDS loss's one list of guidance terms, built as sampling builds it.

    :func:`decoupled_terms` makes the ``domain`` term (its ``model`` set to ``domain_model``,
    present only when one is given) and the ``control`` term (the frozen SD with the prompt);
    ``extra_guidance`` follows, unnamed terms named ``extra_<i>`` by position. ``None`` (or
    ``"auto"``) is the automatic weight; a weight of 0 drops a term.
    """
    w_d, w_c = _weight_arg(w_d), _weight_arg(w_c)
    if domain_model is None:
        if w_d not in (None, 0):
            raise ValueError(
                f"w_d={w_d} but no domain_model was given; pass domain_model=NullTextUNet... or "
                "set w_d=0"
            )
        w_d = 0.0  # no domain model: the automatic domain term is simply absent
    _check_interval("domain_interval", domain_interval)
    _check_interval("control_interval", control_interval)
    terms = [
        replace(t, model=domain_model) if t.name == DOMAIN else t
        for t in decoupled_terms(w_d, w_c, domain_interval, control_interval)
    ]
    for i, g in enumerate(extra_guidance):
        name = g.name or f"extra_{i}"
        if any(t.name == name for t in terms):
            raise ValueError(f"guidance term name '{name}' is used twice; names must be unique")
        if g.weight == 0:
            continue
        if g.control_image is not None and not isinstance(g.control_image, torch.Tensor):
            raise ValueError(
                f"GuidanceTerm '{name}': SDS takes control_image as a [1 or B, 3, H, W] "
                f"tensor in [0, 1], got {type(g.control_image).__name__}"
            )
        terms.append(g if g.name == name else replace(g, name=name))
    return terms


class MultiGuidanceSDS:
    """SDS loss whose noise prediction is the multi-guidance mix of ``idgen.guidance``.

    Args:
        sd: a loaded SD1.5- or SDXL-family pipeline (``idgen.models.load_sd`` /
            ``build_tiny_sd`` / ``build_tiny_sdxl``); its UNet, VAE and text encoder(s) are frozen
            (``requires_grad_(False)``), gradients still reach the renders through the VAE
            encoder. Its model family says how prompts are encoded, what the unconditional
            branch is (SDXL: zeros for ``negative_prompt=""``, as diffusers) and which added
            conditions the UNets get (SDXL: pooled text and the render size as ``time_ids``).
        prompt: the text of the control term.
        domain_model: a text-free model called as ``model(z_t, t)`` (``NullTextUNet``); optional.
        w_d, w_c: weights of the domain and control terms; ``None`` = the paper's automatic
            weight ``w0 / K |eps_sd| / |eps_i|``, computed at the first call (the batch mean) and
            held for the run; ``0`` drops the term.
        negative_prompt: text of the unconditional prediction ``eps_sd(z_t, "")`` (``""``: the
            family's unconditional branch).
        controlnet: optional ControlNet on the control term; give its condition per call
            (``control_images={"control": ...}``, e.g. the render's depth), pixels in ``[0, 1]``.
        extra_guidance: more ``GuidanceTerm``s (community checkpoints, a second domain model...).
            ``start``/``end`` are fractions of the denoising schedule as in sampling: a view whose
            ``t`` lies outside ``[1 - end, 1 - start] * T`` gets weight 0 for that term.
        domain_interval, control_interval: the same ``(start, end)`` for the domain and the
            control term (``idgen-sample``'s ``sampler.domain_interval``/``control_interval``).
        timesteps: the timestep range and its annealing; weighting: ``w(t)``.
        grad_clip: clamp each element of ``grad`` to ``[-grad_clip, grad_clip]`` (None: off).
        resolution: the pixel size renders are resized to before encoding (None: the model's
            native size, ``unet.sample_size * vae factor``).
        target: ``"latent"``: ``grad`` on the latents, back-propagated through the VAE encoder
            (DreamFusion with a latent model); ``"image"``: ``grad = w(t) (x - D(z0_hat))`` on
            the (resized) renders, no encoder in the backward pass (pixel inputs only).

    Attributes:
        terms: the ``GuidanceTerm`` list of :func:`sds_terms` (sampling's own term type).
        embeds: each term's ``[1, L, D]`` text features by name (None: a text-free model);
            pooled: their pooled embeddings (None unless the family has them).
        held: the automatic weights once computed (``state_dict`` saves them).
    """

    def __init__(
        self,
        sd: Any,
        prompt: str,
        domain_model: Any = None,
        w_d: float | None = None,
        w_c: float | None = None,
        negative_prompt: str = "",
        w0: float = 7.0,
        controlnet: Any = None,
        extra_guidance: Sequence[GuidanceTerm] = (),
        timesteps: TimestepSchedule | None = None,
        weighting: Weighting = "sds",
        grad_clip: float | None = None,
        resolution: int | None = None,
        target: Literal["latent", "image"] = "latent",
        domain_interval: Sequence[float] = (0.0, 1.0),
        control_interval: Sequence[float] = (0.0, 1.0),
    ):
        self.sd = sd
        self.family = family_of(sd)
        if controlnet is not None:
            self.family.require("controlnet", "controlnet", type(controlnet).__name__)
        self.unet, self.vae = sd.unet, sd.vae
        frozen = [m for m in sd.components.values() if isinstance(m, torch.nn.Module)]
        for module in (*frozen, domain_model, controlnet):
            if module is not None:
                module.requires_grad_(False)
        self.device = sd.unet.device
        self.w0 = float(w0)
        self.timesteps = timesteps or TimestepSchedule()
        sds_weight(torch.zeros(1), weighting)  # raises on an unknown weighting, naming it
        self.weighting = weighting
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.grad_clip = grad_clip
        if target not in ("latent", "image"):
            raise ValueError(f"target must be 'latent' or 'image', got {target!r}")
        self.target = target
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_scale_factor = factor
        self.resolution = int(resolution or sd.unet.config.sample_size * factor)
        if self.resolution % factor:
            raise ValueError(f"resolution must be a multiple of {factor}, got {self.resolution}")
        scheduler = sd.scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        to_epsilon(torch.zeros(1), torch.zeros(1), torch.ones(1), self.prediction_type)
        # The render size as SDXL's time_ids (original = target = resolution, no crop; None for
        # families without size conditioning)
        size = torch.tensor([self.resolution, self.resolution])
        self.time_ids = self.family.time_ids(size, torch.zeros(2), size)
        self.uncond_embeds, self.uncond_pooled = self._encode(negative_prompt)
        if negative_prompt == "":
            self.uncond_embeds, self.uncond_pooled = self.family.uncond_embeds(
                sd, self.uncond_embeds, self.uncond_pooled
            )
        self.terms = sds_terms(
            domain_model, w_d, w_c, domain_interval, control_interval, extra_guidance
        )
        # Resolved once per term: its text features ([1, L, D]; None for a text-free model) and
        # its ControlNet. The SDS's own ``controlnet`` belongs to the control term, whose
        # condition (the render's depth...) comes with each call, as in sampling.
        encoded = {t.name: self._term_embeds(t, prompt) for t in self.terms}
        self.embeds = {name: e[0] for name, e in encoded.items()}
        self.pooled = {name: e[1] for name, e in encoded.items()}
        self.controlnets = {t.name: t.controlnet for t in self.terms if t.controlnet is not None}
        if controlnet is not None and any(t.name == CONTROL for t in self.terms):
            self.controlnets[CONTROL] = controlnet
        # Automatic weights once computed (name -> float); saved with checkpoints for resume.
        self.held: dict[str, float] = {}

    # ------------------------------------------------------------------------------ set-up

    @torch.no_grad()
    def encode_text(self, text: str, text_encoder: Any = None) -> torch.Tensor:
        """``[1, 77, D]`` features of ``text`` from the project's one prompt encoder (frozen)."""
        return encode_text(self.sd.tokenizer, text_encoder or self.sd.text_encoder, [text])

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``text``'s features and pooled embedding as the base family encodes them."""
        embeds, pooled = self.family.encode_prompt(self.sd, [text], self.device)
        return embeds, pooled

    def _term_embeds(self, term: GuidanceTerm, prompt: str) -> tuple[Any, Any]:
        """A term's ``([1, L, D]`` text features, pooled``)``: its ``prompt_embeds``, else its
        ``prompt`` (or the SDS prompt) through its own or SD's text encoder; ``(None, None)``
        for a text-free model."""
        if term.model is not None and not accepts_text(term.model):
            return None, None
        if term.prompt_embeds is not None or term.text_encoder is not None:
            if self.family.addition_embed_type is not None:
                raise ValueError(
                    f"GuidanceTerm '{term.name}': prompt_embeds or a text encoder of its own "
                    f"are not implemented on {self.family.name} bases (no pooled embedding); "
                    "give the term a prompt."
                )
            if term.prompt_embeds is not None:
                return term.prompt_embeds[:1].to(self.device), None
        text = term.prompt if term.prompt is not None else prompt
        if term.text_encoder is not None:
            return self.encode_text(text, term.text_encoder), None
        return self._encode(text)

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, float]:
        """The held automatic weights (resume a run with the same weights)."""
        return dict(self.held)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.held = {str(k): float(v) for k, v in state.items()}

    # ------------------------------------------------------------------------------ compute

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Renders ``[B, 3, H, W]`` in ``[0, 1]`` at the model's pixel size (differentiable)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(
                images, (self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        return images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Renders ``[B, 3, H, W]`` in ``[0, 1]`` -> scaled VAE latents (the posterior mean),
        differentiable with respect to the renders."""
        x = (self.resize(images) * 2 - 1).to(self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels ``[B, 3, H, W]`` in ``[0, 1]`` (float32)."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def _control(
        self, term: GuidanceTerm, control_images: Mapping[str, torch.Tensor], batch: int
    ) -> torch.Tensor | None:
        """The term's ControlNet condition for ``batch`` views (None: the term has no ControlNet)."""
        image = control_images.get(term.name, term.control_image)
        if term.name not in self.controlnets:
            if term.name in control_images:
                raise ValueError(
                    f"control_images['{term.name}'] given but that term has no controlnet"
                )
            return None
        if image is None:
            raise ValueError(
                f"term '{term.name}' has a controlnet: pass control_images={{'{term.name}': ...}}"
            )
        image = image.to(self.device, torch.float32)
        if image.shape[-2:] != (self.resolution, self.resolution):
            image = F.interpolate(image, (self.resolution, self.resolution), mode="bilinear")
        return image.expand(batch, -1, -1, -1) if image.shape[0] == 1 else image

    def _run(self, model, x, t, embeds=None, controlnet=None, control=None, scale=1.0, pooled=None):
        x = x.to(model.dtype)
        ids = None if self.time_ids is None else self.time_ids.to(x).expand(x.shape[0], -1)
        if embeds is None:  # a text-free model; SDXL's domain UNet also takes the size ids
            extra = {} if ids is None else {"time_ids": ids}
            return model(x, t, return_dict=False, **extra)[0]
        embeds = embeds.to(model.dtype)
        if pooled is not None:
            pooled = pooled.to(model.dtype).expand(x.shape[0], -1)
        kwargs = {"added_cond_kwargs": self.family.added_cond_kwargs(pooled, ids)}
        if controlnet is not None:
            down, mid = controlnet(
                x,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=control.to(controlnet.dtype),
                conditioning_scale=scale,
                return_dict=False,
            )
            kwargs |= {
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }
        return model(x, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    @torch.no_grad()
    def predictions(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        control_images: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``eps_sd(z_t, negative)`` and each term's ``eps_i(z_t)`` as noise predictions (float32).

        The frozen SD's unconditional prediction and every plain-text SD term share one batched
        forward, as in sampling.
        """
        control_images = dict(control_images or {})
        unknown = set(control_images) - {term.name for term in self.terms}
        if unknown:
            raise ValueError(f"control_images for unknown terms {sorted(unknown)}")
        b = z_t.shape[0]
        alpha_bar = self.alphas_cumprod[t]
        # The uncond row first, then every frozen-SD term without a ControlNet.
        batched = [x.name for x in self.terms if x.model is None and x.name not in self.controlnets]
        rows = [self.uncond_embeds] + [self.embeds[name] for name in batched]
        embeds = torch.cat([e.expand(b, -1, -1) for e in rows])
        pooled = None
        if self.uncond_pooled is not None:
            pooled_rows = [self.uncond_pooled] + [self.pooled[name] for name in batched]
            pooled = torch.cat([p.expand(b, -1) for p in pooled_rows])
        k = len(rows)
        out = self._run(self.unet, torch.cat([z_t] * k), torch.cat([t] * k), embeds, pooled=pooled)
        chunks = [to_epsilon(e, z_t, alpha_bar, self.prediction_type) for e in out.chunk(k)]
        eps_0 = chunks[0]
        preds = dict(zip(batched, chunks[1:], strict=True))
        for x in self.terms:
            if x.name in preds:
                continue
            model = self.unet if x.model is None else x.model
            control = self._control(x, control_images, b)
            embeds = self.embeds[x.name]
            embeds = None if embeds is None else embeds.expand(b, -1, -1)
            controlnet = self.controlnets.get(x.name)
            scale = x.controlnet_conditioning_scale
            pooled = self.pooled[x.name]
            eps = self._run(model, z_t, t, embeds, controlnet, control, scale, pooled)
            preds[x.name] = to_epsilon(eps, z_t, alpha_bar, self.prediction_type)
        return eps_0, preds

    def _weights(self, eps_0, preds, t) -> dict[str, torch.Tensor]:
        """Per-view weights ``[B]``: fixed or held auto weight, 0 where the term is off at ``t``."""
        # A view at timestep t sits at fraction 1 - t/T of the denoising schedule (t = T first).
        progress = 1.0 - t.float() / self.num_train_timesteps
        weights = {}
        for x in self.terms:
            if x.weight == "auto" and x.name not in self.held:
                w = auto_weight(eps_0, preds[x.name], self.w0, num_terms=len(self.terms))
                self.held[x.name] = float(w.mean())
            value = self.held[x.name] if x.weight == "auto" else float(x.weight)
            on = (progress >= x.start) & (progress <= x.end)
            weights[x.name] = torch.where(on, value, 0.0).to(eps_0.dtype)
        return weights

    def __call__(
        self,
        images: torch.Tensor | None = None,
        *,
        latents: torch.Tensor | None = None,
        step: int = 0,
        total_steps: int = 1,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        control_images: Mapping[str, torch.Tensor] | None = None,
    ) -> SDSOutput:
        """SDS loss of renders ``images`` (``[B, 3, H, W]`` in ``[0, 1]``) or of ``latents``.

        ``step``/``total_steps`` drive the timestep annealing; ``t`` and ``noise`` override the
        random draws (``generator``, on the CPU) for reproducible evaluations.
        """
        if (images is None) == (latents is None):
            raise ValueError("give exactly one of images (pixels in [0, 1]) or latents")
        if self.target == "image" and images is None:
            raise ValueError("target='image' needs pixel renders (images=...), not latents")
        # 1. Latents of the renders (gradients flow through the VAE encoder, unless the step is
        # taken in image space)
        if self.target == "image":
            pixels = self.resize(images)
            with torch.no_grad():
                z = self.encode(pixels)
        else:
            z = self.encode(images) if images is not None else latents
        b = z.shape[0]
        # 2. Timesteps and noise
        if t is None:
            t = self.timesteps.sample(
                b, self.num_train_timesteps, step, total_steps, generator, self.device
            )
        t = t.to(self.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        elif t.numel() != b:
            raise ValueError(f"got {t.numel()} timesteps for {b} views")
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device)
        # 3. Noisy latents and the multi-guidance prediction (no graph through the UNets)
        with torch.no_grad():
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            z_t = a.sqrt() * z.detach().float() + (1 - a).sqrt() * noise.float()
            eps_0, preds = self.predictions(z_t, t, control_images)
            weights = self._weights(eps_0, preds, t)
            names = [x.name for x in self.terms]
            eps_hat = multi_guidance(eps_0, [preds[n] for n in names], [weights[n] for n in names])
            # 4. grad = w(t) (eps_hat - eps), or w(t) (x - D(z0_hat)) in image space; finite and
            # optionally clamped
            w_t = sds_weight(self.alphas_cumprod[t], self.weighting).view(-1, 1, 1, 1)
            if self.target == "image":
                z0_hat = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
                grad = w_t * (pixels.detach().float() - self.decode(z0_hat))
            else:
                grad = w_t * (eps_hat - noise.float())
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            if self.grad_clip is not None:
                grad = grad.clamp(-self.grad_clip, self.grad_clip)
        # 5. The loss whose gradient with respect to z (or the pixels) is grad / B
        if self.target == "image":
            loss = sds_loss(pixels, grad.to(pixels.dtype))
        else:
            loss = sds_loss(z, grad.to(z.dtype))
        return SDSOutput(loss, t, grad, eps_hat, weights)
