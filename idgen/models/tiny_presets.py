"""What each tiny preset looks like, as plain data (no torch or diffusers import), so config
checks can read a tiny base's geometry without building it.

The numbers are those of the builders in ``idgen.models.tiny``, ``tiny_sdxl`` and ``tiny_sd3``
(``tests/test_models.py`` checks them against the built models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: builder name -> (the model config -> geometry); ``name`` is what the modules record as the
#: base of a tiny run (``base_model``)
TINY_GEOMETRY: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "build_tiny_sd": lambda model: {
        "vae_factor": 8,
        "in_channels": 4,
        "sample_size": 8,
        "cross_attention_dim": int(model.get("cross_attention_dim") or 32),
        "name": "tiny",
        "family": "sd15",
    },
    "build_tiny_sdxl": lambda model: {
        "vae_factor": 8,
        "in_channels": 4,
        "sample_size": 8,
        "cross_attention_dim": 64,
        "name": "tiny",
        "family": "sdxl",
    },
    "build_tiny_sd3": lambda model: {
        "vae_factor": 8,
        "in_channels": 16,
        "sample_size": 8,
        "name": "tiny",
        "family": "sd3",
        "text_encoder_3": bool(model.get("t5")),
    },
}


def tiny_geometry(model: dict[str, Any]) -> dict[str, Any] | None:
    """The geometry of a tiny preset config (its ``_target_`` names the builder), else None."""
    builder = str(model.get("_target_", "")).rsplit(".", 1)[-1]
    preset = TINY_GEOMETRY.get(builder)
    return None if preset is None else preset(model)
