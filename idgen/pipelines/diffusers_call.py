"""What a diffusers user expects of a pipeline call, for idgen's multi-guidance pipelines.

diffusers' Stable Diffusion pipelines share call arguments and properties (``guidance_scale``,
``guidance_rescale``, ``clip_skip``, ``cross_attention_kwargs``, ``num_timesteps``,
``interrupt``, ``eta``) and a callback convention: a step-end callback may set
``pipeline._guidance_scale`` (diffusers' ``SDCFGCutoffCallback`` sets it to 0 to switch
classifier-free guidance off). :class:`DiffusersCallMixin` gives a pipeline whose guidance is a
list of :class:`~idgen.guidance.GuidanceTerm` mixed by a :class:`~idgen.guidance.Guider` the same
surface; the ``guidance_scale`` of diffusers is the weight of the term named ``control`` (``w_c``).

Units: ``w_c`` is the paper's weight (``eps_0 + w_c (eps_c - eps_0)`` at every value). A value
given as ``guidance_scale`` (call argument or ``_guidance_scale`` set by a callback) has
diffusers' meaning: above 1 it is ``w_c``; at or below 1 guidance is off, i.e. the control term's
prediction alone, which is ``w_c = 1``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from idgen.guidance import CONTROL, Guider

Weight = float | torch.Tensor


def resolve_guidance_scale(guidance_scale: float | None, w_c: float | None) -> float | None:
    """``w_c`` from the call's ``w_c`` or its diffusers alias ``guidance_scale`` (one of the two)."""
    if guidance_scale is None:
        return w_c
    if w_c is not None:
        raise ValueError(
            f"got both guidance_scale={guidance_scale} and w_c={w_c}; guidance_scale is "
            "diffusers' name for w_c (the control weight): pass one of them."
        )
    check_finite_weight("guidance_scale", guidance_scale)
    return cfg_weight(float(guidance_scale))


def cfg_weight(scale: Weight) -> Weight:
    """A diffusers ``guidance_scale`` as the control weight: at or below 1 guidance is off (the
    control term's prediction alone, ``w_c = 1``), as ``do_classifier_free_guidance`` decides."""
    if isinstance(scale, torch.Tensor):
        return torch.where(scale > 1, scale, torch.ones_like(scale))
    return float(scale) if float(scale) > 1 else 1.0


def check_finite_weight(name: str, value: Any, where: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` when a guidance weight is not a finite number/tensor."""
    if isinstance(value, torch.Tensor):
        ok = value.is_floating_point() and bool(torch.isfinite(value).all())
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ValueError(
            f"{name}={value!r}{where} is not a finite number; guidance weights must be finite "
            "(a callback that changes them must return finite values)."
        )


def extra_step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """``scheduler.step`` extras as diffusers passes them: ``eta`` (DDIM's eta) and ``generator``
    where the scheduler accepts them (``prepare_extra_step_kwargs``)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in accepted:
        out["eta"] = eta
    if "generator" in accepted:
        out["generator"] = generator
    return out


def rescale_guided(
    noise_pred: torch.Tensor, reference: torch.Tensor | None, guidance_rescale: float
) -> torch.Tensor:
    """Lin et al.'s rescale (diffusers' ``rescale_noise_cfg``) of the combined prediction toward
    the standard deviation of ``reference`` (the control term's prediction, the "text" branch of
    classifier-free guidance); unchanged when ``guidance_rescale`` is 0 or there is no reference."""
    if guidance_rescale <= 0.0 or reference is None:
        return noise_pred
    return rescale_noise_cfg(noise_pred, reference, guidance_rescale=guidance_rescale)


def replaced_rows(
    outputs: dict[str, Any], key: str, before: torch.Tensor | None, rows: int, step: int
) -> torch.Tensor | None:
    """The tensor a step-end callback returned under ``key`` in place of ``before`` (popped from
    ``outputs``), or None when it returned none or the same; it must keep one row per image."""
    new = outputs.pop(key, before)
    if new is before or new is None:
        return None
    if new.shape[0] != rows:
        raise ValueError(
            f"callback_on_step_end returned {key} with {new.shape[0]} rows at step {step}; this "
            f"run needs one row per image ({rows})."
        )
    return new


class DiffusersCallMixin:
    """diffusers' call-state properties for a pipeline that mixes guidance terms.

    A pipeline calls :meth:`_start_call` at the top of ``__call__``, sets ``_num_timesteps``,
    checks :attr:`interrupt` at each step, calls :meth:`_sync_guidance_scale` after combining and
    :meth:`_apply_callback_weights` after its step-end callback.
    """

    _guidance_scale: Weight | None = None
    _guidance_rescale: float = 0.0
    _clip_skip: int | None = None
    _cross_attention_kwargs: dict[str, Any] | None = None
    _num_timesteps: int = 0
    _interrupt: bool = False

    @property
    def guidance_scale(self) -> Weight | None:
        """The control term's weight ``w_c`` (``None`` until automatic weights are set; a ``[B]``
        tensor for per-sample automatic weights)."""
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' meaning: the control weight is above 1 (automatic weights count as on).
        The frozen SD's unconditional prediction is computed either way (every term's base)."""
        w = self._guidance_scale
        if w is None:
            return True
        return bool(torch.as_tensor(w).gt(1).any())

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipeline._interrupt = True`` in a callback to skip the remaining steps."""
        return self._interrupt

    def _start_call(
        self,
        w_c: float | None,
        guidance_rescale: float,
        clip_skip: int | None,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> None:
        self._guidance_scale = w_c
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self._num_timesteps = 0

    @property
    def _lora_scale_of_call(self) -> float | None:
        """The ``scale`` of ``cross_attention_kwargs`` (LoRA scale for the text encoder)."""
        kwargs = self._cross_attention_kwargs
        return None if kwargs is None else kwargs.get("scale", None)

    def _sync_guidance_scale(self, guider: Guider) -> None:
        """After automatic weights are set, ``guidance_scale`` reports the control weight used."""
        if self._guidance_scale is None and CONTROL in guider.weights:
            self._guidance_scale = guider.weights[CONTROL]

    def _apply_callback_weights(
        self, guider: Guider, step: int, scale_before: Any, outputs: dict[str, Any]
    ) -> None:
        """Weight changes a step-end callback made, applied from the next step on.

        ``pipeline._guidance_scale`` changed (diffusers' convention, in diffusers' units) sets the
        control weight; ``outputs["guidance_weights"]`` (``{term name: weight}``) sets any term's
        weight in the paper's units. Non-finite weights raise.
        """
        where = f" (set by callback_on_step_end at step {step})"
        names = {t.name for t in guider.terms}
        for name, w in (outputs.pop("guidance_weights", None) or {}).items():
            if name not in names:
                raise ValueError(
                    f"callback_on_step_end returned a weight for guidance term '{name}', which is "
                    f"not in this run (terms: {sorted(names)})."
                )
            check_finite_weight(f"guidance_weights['{name}']", w, where)
            guider.weights[name] = w if isinstance(w, torch.Tensor) else float(w)
        if self._guidance_scale is scale_before:
            return
        check_finite_weight("pipeline._guidance_scale", self._guidance_scale, where)
        if CONTROL not in names:
            raise ValueError(
                f"pipeline._guidance_scale was set{where} but this run has no control term "
                "(w_c=0): give w_c (or guidance_scale) a weight to change it mid-run."
            )
        guider.weights[CONTROL] = cfg_weight(self._guidance_scale)


class CheckedLoraMixin:
    """diffusers' ``load_lora_weights`` after a check that the LoRA fits this pipeline's frozen
    models (the family's parts and every layer's size, :func:`idgen.models.lora.pipe_lora_problem`):
    a LoRA for another base or family is one ``ValueError`` line, and nothing is loaded. Put it
    before the diffusers LoRA loader mixin in the bases."""

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Any,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        from idgen.models.lora import pipe_lora_problem

        source = pretrained_model_name_or_path_or_dict
        why = pipe_lora_problem(self, source, kwargs.get("weight_name"))
        if why:
            shown = "state dict" if isinstance(source, dict) else source
            raise ValueError(f"LoRA '{shown}' {why}.")
        super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)
