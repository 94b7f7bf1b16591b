"""Mixing noise predictions from several guidance sources (paper Eq. 3 and §3.4).

``decoupled_terms`` turns the paper's ``w_d`` / ``w_c`` into two :class:`GuidanceTerm`; the
:class:`Guider` mixes any list of terms step by step::

    eps = eps_0 + sum_i w_i (eps_i - eps_0)          eps_0 = eps_sd(z_t, "")

which for the two terms is ``(1 - w_d - w_c) eps_sd(z,"") + w_d eps_d(z) + w_c eps_sd(z, c)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from idgen.guidance.terms import DOMAIN_UNET, GuidanceTerm
from idgen.guidance.weights import auto_weight, is_active

Weight = float | torch.Tensor

DOMAIN, CONTROL = "domain", "control"  # names of the paper's two terms


def _as_batch_weight(w: Weight, like: torch.Tensor) -> Weight:
    """A float stays a float (bit-exact with diffusers' CFG); a per-sample [B] tensor broadcasts."""
    if isinstance(w, torch.Tensor):
        if w.ndim == 0:
            return w.to(like.dtype)
        return w.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return float(w)


def add_directions(
    eps_0: torch.Tensor, directions: Sequence[torch.Tensor], weights: Sequence[Weight]
) -> torch.Tensor:
    """``eps_0 + sum_i w_i d_i`` for guidance directions ``d_i = eps_i - eps_0``."""
    if len(directions) != len(weights):
        raise ValueError(f"got {len(directions)} predictions but {len(weights)} weights")
    out = eps_0
    for d_i, w_i in zip(directions, weights, strict=True):
        out = out + _as_batch_weight(w_i, eps_0) * d_i
    return out


def multi_guidance(
    eps_0: torch.Tensor, eps_terms: Sequence[torch.Tensor], weights: Sequence[Weight]
) -> torch.Tensor:
    """General K-term guidance ``eps_0 + sum_i w_i (eps_i - eps_0)`` (paper Eq. 3).

    ``eps_0`` is the unconditional prediction; each weight is a float or a per-sample ``[B]`` tensor.
    """
    if len(eps_terms) != len(weights):
        raise ValueError(f"got {len(eps_terms)} predictions but {len(weights)} weights")
    return add_directions(eps_0, [eps_i - eps_0 for eps_i in eps_terms], weights)


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: Weight) -> torch.Tensor:
    """Classifier-free guidance ``eps_u + s (eps_c - eps_u)``, the one-term case of Eq. 3."""
    return multi_guidance(eps_uncond, [eps_cond], [scale])


def decoupled_guidance(
    eps_sd_uncond: torch.Tensor,
    eps_domain: torch.Tensor,
    eps_control: torch.Tensor,
    w_d: Weight,
    w_c: Weight,
) -> torch.Tensor:
    """The paper's three-term form ``(1 - w_d - w_c) eps_sd(z,"") + w_d eps_d(z) + w_c eps_c(z, c)``."""
    w_d = _as_batch_weight(w_d, eps_sd_uncond)
    w_c = _as_batch_weight(w_c, eps_sd_uncond)
    return (1 - w_d - w_c) * eps_sd_uncond + w_d * eps_domain + w_c * eps_control


def decoupled_terms(
    w_d: float | None = None,
    w_c: float | None = None,
    domain_interval: Sequence[float] = (0.0, 1.0),
    control_interval: Sequence[float] = (0.0, 1.0),
    domain_reuse_every: int = 1,
    control_reuse_every: int = 1,
) -> list[GuidanceTerm]:
    """The paper's two terms: ``domain`` (the pipeline's ``domain_unet``, weight ``w_d``) and
    ``control`` (the frozen SD with the call's prompt and ControlNet, weight ``w_c``).

    ``None`` is the automatic weight; a weight of 0 drops the term (and its forward pass).
    """
    terms = []
    for name, w, interval, k, model in (
        (DOMAIN, w_d, domain_interval, domain_reuse_every, DOMAIN_UNET),
        (CONTROL, w_c, control_interval, control_reuse_every, None),
    ):
        if w is not None and float(w) == 0.0:
            continue
        start, end = (float(v) for v in interval)
        weight = "auto" if w is None else float(w)
        terms.append(GuidanceTerm(name, model, weight=weight, start=start, end=end, reuse_every=k))
    return terms


class Guider:
    """Mixes a list of guidance terms over one sampling run, holding each term's state.

    Per term: the weight (a number, or ``auto``: ``w0 / K * |eps_0| / |eps_i|`` per sample at the
    term's first active step, then held), the active interval, and with ``reuse_every = k`` the
    guidance direction ``eps_i - eps_0`` of its last prediction, reused for ``k - 1`` steps.
    """

    def __init__(self, terms: Sequence[GuidanceTerm], num_steps: int, w0: float = 7.0):
        names = [t.name for t in terms]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"guidance terms need unique, non-empty names, got {names}")
        self.terms = list(terms)
        self.num_steps = num_steps
        self.w0 = w0
        self.weights: dict[str, Weight] = {}
        self._directions: dict[str, tuple[int, torch.Tensor]] = {}

    def active(self, step: int) -> list[GuidanceTerm]:
        """Terms whose interval covers ``step`` (the others drop out of the mix)."""
        return [t for t in self.terms if is_active(step, self.num_steps, t.start, t.end)]

    def to_predict(self, step: int) -> list[GuidanceTerm]:
        """Active terms that need a fresh prediction at ``step`` (none reused)."""
        out = []
        for t in self.active(step):
            last = self._directions.get(t.name)
            if last is None or step - last[0] >= t.reuse_every:
                out.append(t)
        return out

    def combine(
        self, step: int, eps_0: torch.Tensor, preds: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``eps_0 + sum_i w_i (eps_i - eps_0)`` over the active terms (paper Eq. 3).

        ``preds`` holds the fresh predictions of :meth:`to_predict`'s terms.
        """
        directions, weights = [], []
        for t in self.active(step):
            if t.name in preds:
                direction = preds[t.name] - eps_0
                if t.reuse_every > 1:  # kept only when it will be reused
                    self._directions[t.name] = (step, direction)
                else:
                    self._directions[t.name] = (step, eps_0.new_empty(0))
            else:
                direction = self._directions[t.name][1]
            if t.name not in self.weights:
                self.weights[t.name] = (
                    auto_weight(eps_0, preds[t.name], self.w0, num_terms=len(self.terms))
                    if t.weight == "auto"
                    else float(t.weight)
                )
            directions.append(direction)
            weights.append(self.weights[t.name])
        return add_directions(eps_0, directions, weights)

    def used_weights(self, rows: int) -> dict[str, torch.Tensor]:
        """``{term: [rows] weights}`` on the CPU; 0 for a term that was never active."""
        out = {}
        for t in self.terms:
            w = self.weights.get(t.name, 0.0)
            out[t.name] = (
                w.float().cpu() if isinstance(w, torch.Tensor) else torch.full((rows,), float(w))
            )
        return out
