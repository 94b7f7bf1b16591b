"""Library noise off, our own lines on: each stage should say one clear thing, not ten.

Lightning prints a product tip, "GPU available: False..." and "TPU available..." at every
Trainer, a deprecation from its own pytree helper on every predict/fit, and at every fit
"Found N module(s) in eval mode": idgen's frozen parts (VAE, text encoder, the base UNet) are
in eval mode on purpose, and SD's blocks have no dropout or batch norm whose mode would change
training. None of it is actionable for an idgen user. Only these exact messages are dropped: other warnings and every
line of ours stay.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's rank-zero info lines that repeat at every Trainer (sweeps: at every job)
_LIGHTNING_NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
# warnings raised inside libraries, not by our calls (see the module docstring)
_WARNING_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r"Found \d+ module\(s\) in eval mode at the start of training",
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Install the filters (idempotent; called when idgen is imported)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(_LIGHTNING_NOISE))
    for pattern in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
