"""One dtype parser for every config field that names a dtype (``dtype``, ``model.torch_dtype``,
``module.vae_dtype``, ``module.frozen_dtype``)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: short and torch spellings accepted on the command line
ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


def parse_dtype(name: str | torch.dtype, field: str) -> torch.dtype:
    """``torch.float16`` for ``"float16"``, ``"fp16"``, ``"half"``, ``"torch.float16"`` or the dtype.

    Anything else is a ``ValueError`` naming ``field`` and the accepted names.
    """
    if isinstance(name, torch.dtype):
        return name
    text = str(name).strip().lower().removeprefix("torch.")
    key = ALIASES.get(text, text)
    if key not in DTYPES:
        raise ValueError(
            f"{field}={name!r} is not a dtype; use one of {sorted(DTYPES)} (or {sorted(ALIASES)})."
        )
    return DTYPES[key]


def parse_optional_dtype(name: str | torch.dtype | None, field: str) -> torch.dtype | None:
    """:func:`parse_dtype`, with ``None`` (keep the models' own dtype) passed through."""
    return None if name is None else parse_dtype(name, field)
