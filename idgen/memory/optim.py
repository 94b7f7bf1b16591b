"""Optimizers by memory need (``memory.optimizer``) and the fused backward pass.

``build_optimizer`` takes lr, betas, weight decay and eps from the module's optimizer partial
(``module.optimizer``), so switching ``memory.optimizer`` keeps the recipe's hyperparameters.

:class:`FusedBackwardOptimizer` steps each parameter inside its
``Tensor.register_post_accumulate_grad_hook`` (PyTorch's "fuse the optimizer step into
backward" pattern) and frees its gradient at once, so a full set of gradients never exists.
To Lightning it is one ordinary optimizer: ``step(closure)`` runs the closure (forward and
backward, during which the parameters are updated), learning-rate schedulers change its
``param_groups`` (copied to the per-parameter optimizers before each update), and its
``state_dict`` is the usual per-parameter state, so checkpoints resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from idgen.utils.validation import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
_HYPER = ("lr", "betas", "weight_decay", "eps")


def hyperparameters(factory: OptimizerFactory) -> dict[str, Any]:
    """lr, betas, weight decay and eps of a ``functools.partial`` optimizer (``module.optimizer``)."""
    keywords = dict(getattr(factory, "keywords", {}) or {})
    out = {k: keywords[k] for k in _HYPER if k in keywords}
    if "betas" in out:
        out["betas"] = tuple(float(b) for b in out["betas"])
    out.setdefault("lr", 1e-3)
    return out


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], factory: OptimizerFactory
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`idgen.memory.settings.OPTIMIZERS`) over ``params``."""
    params = list(params)
    if name == "config":
        return factory(params=params)
    hp = hyperparameters(factory)
    if name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(params, **hp, fused=True if name == "adamw_fused" else None)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                "memory.optimizer",
                name,
                f"needs bitsandbytes, which does not import ({err})",
                "pip install 'idgen[memory]', or choose memory.optimizer=adafactor.",
            ) from err
        return bnb.optim.AdamW8bit(params, **hp)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the recipe's), no momentum: the factored second moment only.
        return Adafactor(
            params,
            lr=hp["lr"],
            eps=(1e-30, 1e-3),
            weight_decay=hp.get("weight_decay", 0.0),
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            beta1=None,
        )
    raise ConfigError(
        "memory.optimizer", name, "is not a known optimizer", "See memory/default.yaml."
    )


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped in that parameter's post-accumulate-grad hook.

    Args:
        params: the trained parameters (one group).
        make: builds the optimizer of one parameter list (e.g. ``partial(build_optimizer, name,
            factory=...)``).
        check_grad: called with each gradient before its update; may raise (stop) or return
            False (skip this parameter's update).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        check_grad: Callable[[nn.Parameter], bool] | None = None,
    ) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("FusedBackwardOptimizer got no trainable parameters")
        self.inner = {p: make([p]) for p in params}
        first = self.inner[params[0]]
        super().__init__([{"params": params}], dict(first.defaults))
        self.check_grad = check_grad
        self._link_states()
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _link_states(self) -> None:
        # One state dict per parameter, shared with its own optimizer: Lightning checkpoints
        # ``self.state_dict()`` and the per-parameter optimizers read and update the same dicts.
        for p, opt in self.inner.items():
            if p in self.state:
                opt.state[p] = self.state[p]
            else:
                self.state[p] = opt.state[p]

    @torch.no_grad()
    def _step_one(self, param: nn.Parameter) -> None:
        if param.grad is None:
            return
        if self.check_grad is None or self.check_grad(param):
            inner = self.inner[param].param_groups[0]
            for key, value in self.param_groups[0].items():
                if key != "params":
                    inner[key] = value
            self.inner[param].step()
        param.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (forward + backward): the parameters are updated inside it."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link_states()

    def remove_hooks(self) -> None:
        """Detach from the parameters (the optimizer is done)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def fused_backward_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    factory: OptimizerFactory,
    check_grad: Callable[[nn.Parameter], bool] | None = None,
) -> FusedBackwardOptimizer:
    """``name``'s optimizer, fused into the backward pass."""
    return FusedBackwardOptimizer(
        params, partial(build_optimizer, name, factory=factory), check_grad
    )
