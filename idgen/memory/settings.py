"""The memory options of a training run (``idgen/conf/memory/*.yaml``), checked in one place.

Each option is settable on its own (``memory.optimizer=adafactor``); the presets
``memory=default`` (today's behaviour), ``memory=low`` (the lowest-memory combination that still
trains correctly) and ``memory=gpu24`` gather them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from idgen.utils.validation import ConfigError

#: ``memory.optimizer``: ``config`` keeps ``module.optimizer`` as configured
OPTIMIZERS = ("config", "adamw", "adamw_fused", "adamw8bit", "adafactor")
#: ``memory.ema``: where the EMA shadow lives (``off``: no EMA, raw weights everywhere)
EMA_PLACEMENTS = ("device", "cpu", "off")
FROZEN_DTYPES = ("auto", "float32", "bfloat16")
EMA_DTYPES = ("float32", "bfloat16")
#: precisions Lightning accepts that idgen's plan knows
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


@dataclass(frozen=True)
class MemorySettings:
    """What decides a training run's memory besides the model, batch and resolution.

    Args:
        frozen_dtype: frozen parts (VAE, base UNet, text encoder): ``auto`` = bfloat16 on an
            accelerator when the run's precision is ``bf16-*``, float32 otherwise.
        gradient_checkpointing: recompute activations block by block in the backward pass.
        ema: ``device`` (next to the weights), ``cpu`` (host memory; on a GPU run it costs no
            GPU memory) or ``off``.
        ema_dtype: the EMA shadow's dtype; ``bfloat16`` needs ``1 - decay**ema_every >= 1/256``
            or its updates round away.
        ema_every: update the EMA every k optimizer steps with decay ``decay**k``.
        optimizer: ``config`` (``module.optimizer`` as written), ``adamw``, ``adamw_fused``
            (torch's fused kernel), ``adamw8bit`` (bitsandbytes), ``adafactor`` (transformers,
            factored second moment, no momentum); lr, betas, weight decay and eps are taken from
            ``module.optimizer``.
        fused_backward: step each parameter inside its gradient hook during the backward pass,
            so the full set of gradients is never held (no global-norm clipping, no gradient
            accumulation, one device).
        set_to_none: free gradients after each step instead of zeroing them.
        compile: ``torch.compile`` the trained network.
    """

    frozen_dtype: str = "auto"
    gradient_checkpointing: bool = False
    ema: str = "device"
    ema_dtype: str = "float32"
    ema_every: int = 1
    optimizer: str = "config"
    fused_backward: bool = False
    set_to_none: bool = True
    compile: bool = False

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | MemorySettings | None) -> MemorySettings:
        """Settings from a ``memory`` config node (unknown keys and bad values: one clear error)."""
        if isinstance(node, MemorySettings):
            return node
        node = dict(node or {})
        if node.get("ema") is False:  # YAML reads a bare `off` as false
            node["ema"] = "off"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(
                f"memory.{unknown[0]}",
                node[unknown[0]],
                "is not a memory option",
                f"Use one of {sorted(known)} (see idgen/conf/memory/default.yaml).",
            )
        settings = cls(**node)
        settings.check()
        return settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Each value in its range; packages the choice needs are installed."""
        for key, choices in (
            ("optimizer", OPTIMIZERS),
            ("ema", EMA_PLACEMENTS),
            ("frozen_dtype", FROZEN_DTYPES),
            ("ema_dtype", EMA_DTYPES),
        ):
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(
                    f"memory.{key}", value, "is not a known choice", f"Use one of {choices}."
                )
        for key in ("gradient_checkpointing", "fused_backward", "set_to_none", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"memory.{key}", getattr(self, key), "must be true or false", "Fix it."
                )
        if isinstance(self.ema_every, bool) or not isinstance(self.ema_every, int):
            raise ConfigError("memory.ema_every", self.ema_every, "must be an integer", "")
        if self.ema_every < 1:
            raise ConfigError("memory.ema_every", self.ema_every, "must be >= 1", "")
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "memory.optimizer",
                "adamw8bit",
                "needs bitsandbytes, which is not installed",
                "pip install 'idgen[memory]' (bitsandbytes >= 0.45 runs its 8-bit AdamW on "
                "CPU and CUDA), or choose memory.optimizer=adafactor.",
            )
        if self.optimizer == "adafactor" and importlib.util.find_spec("transformers") is None:
            raise ConfigError("memory.optimizer", "adafactor", "needs transformers", "")


def frozen_dtype(name: str, precision: str | int | None, accelerator: str) -> torch.dtype:
    """``memory.frozen_dtype`` resolved for a run: ``auto`` is bfloat16 on an accelerator when
    the run's precision is ``bf16-*``, float32 otherwise (CPU kernels are fastest in float32)."""
    if name == "auto":
        bf16 = str(precision).startswith("bf16")
        return torch.bfloat16 if bf16 and accelerator not in ("cpu",) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def check_run(settings: MemorySettings, trainer: Mapping[str, Any]) -> None:
    """What the memory options need of the trainer config (``cfg.trainer``)."""
    precision = str(trainer.get("precision", "32-true"))
    accelerator = str(trainer.get("accelerator", "auto"))
    if precision not in PRECISIONS:
        raise ConfigError(
            "trainer.precision",
            precision,
            "is not a precision idgen supports",
            f"Use {PRECISIONS}.",
        )
    if precision.startswith("16") and accelerator == "cpu":
        raise ConfigError(
            "trainer.precision",
            precision,
            "float16 autocast does not run on CPU",
            "Use trainer.precision=bf16-mixed (or 32-true) on CPU.",
        )
    if settings.fused_backward:
        clip = trainer.get("gradient_clip_val")
        if clip:
            raise ConfigError(
                "trainer.gradient_clip_val",
                clip,
                "global-norm clipping needs every gradient at once, which memory.fused_backward "
                "never holds",
                "Set trainer.gradient_clip_val=null (memory=low does), or memory.fused_backward=false.",
            )
        accumulate = trainer.get("accumulate_grad_batches", 1) or 1
        if int(accumulate) != 1:
            raise ConfigError(
                "trainer.accumulate_grad_batches",
                accumulate,
                "gradient accumulation keeps the gradients memory.fused_backward frees",
                "Use a larger data.batch_size, or memory.fused_backward=false.",
            )
        devices = trainer.get("devices", 1)
        nodes = trainer.get("num_nodes", 1) or 1
        if (
            (isinstance(devices, int) and devices > 1)
            or (isinstance(devices, list | tuple) and len(devices) > 1)
            or int(nodes) > 1
        ):
            raise ConfigError(
                "memory.fused_backward",
                True,
                "steps each parameter before DDP has averaged its gradient across devices",
                "Use it on one device (trainer.devices=1), or memory.fused_backward=false.",
            )
