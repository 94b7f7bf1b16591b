"""Library noise off, our own lines on: each stage should say one clear thing, not ten.

Lightning prints a product tip, "GPU available: False..." and "TPU available..." at every
Trainer, a deprecation from its own pytree helper on every predict/fit, and at every fit
"Found N module(s) in eval mode": idgen's frozen parts (VAE, text encoder, the base UNet) are
in eval mode on purpose, and SD's blocks have no dropout or batch norm whose mode would change
training. Also dropped: Lightning's "Total length of DataLoader ... is zero" (the validation
loader is empty on purpose when ``data.val_fraction`` is 0), diffusers' "modules ... should be
kept in float32: []" at every ``.to()`` (an empty list: nothing is kept) and bitsandbytes'
"Failed to load CPU gemm_4bit_forward" (idgen quantises nothing). None of it is actionable for
an idgen user. Only these exact messages are dropped: other warnings and every line of ours stay.
"""

from __future__ import annotations

import logging
import re
import warnings

# Lightning's rank-zero info lines that repeat at every Trainer (sweeps: at every job)
_LIGHTNING_NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
# warnings raised inside libraries, not by our calls (see the module docstring); Lightning's
# "Total length of DataLoader ... zero" is about the validation loader, empty on purpose when
# data.val_fraction is 0
_WARNING_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Total length of `DataLoader` across ranks is zero",
)
# library log lines, by logger: diffusers' "modules ... kept in float32: []" at every `.to()`
# (an empty list: nothing is cast), bitsandbytes' optional CPU kernel (idgen quantises nothing)
_LOG_NOISE = {
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]",
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


class _DropMatch(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(str(record.getMessage())) is None


def _add_filter(name: str, drop: logging.Filter) -> None:
    logger = logging.getLogger(name)
    if not any(type(f) is type(drop) for f in logger.filters):
        logger.addFilter(drop)


def quiet_libraries() -> None:
    """Install the filters (idempotent; called when idgen is imported)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        _add_filter(name, _DropPrefixes(_LIGHTNING_NOISE))
    for name, pattern in _LOG_NOISE.items():
        _add_filter(name, _DropMatch(pattern))
    for pattern in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
