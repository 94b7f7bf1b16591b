"""LoRA files for the frozen SD: does a file fit the base, and loading a list of them.

``lora_problem`` reads a ``.safetensors`` header only (no tensors), so preflight can refuse a
LoRA made for another base (SDXL's second text encoder, another text width, other layer sizes)
in one line before anything heavy runs; ``load_loras`` is diffusers' ``load_lora_weights`` +
``set_adapters`` for ``sampler.lora=[{path: ..., scale: ...}]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idgen.models.single_file import read_single_file_header

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file
# Keys that only LoRAs of other families have.
OTHER_FAMILY_MARKERS = {
    "text_encoder_2.": "SDXL (a second text encoder)",
    "lora_te2_": "SDXL (a second text encoder)",
    "transformer.": "a transformer model (SD3 / FLUX)",
    "lora_transformer_": "a transformer model (SD3 / FLUX)",
}
# diffusers / peft / kohya names of a LoRA's down (in) and up (out) matrices, with the module
# path before them: "<module>.lora_A.weight", "<module>.lora.down.weight",
# "<module>.lora_linear_layer.down.weight", "<module>.lora_down.weight".
_DOWN = re.compile(
    r"^(.*)\.(?:lora_A(?:\.[^.]+)?|lora\.down|lora_linear_layer\.down|lora_down)\.weight$"
)
_UP = re.compile(r"^(.*)\.(?:lora_B(?:\.[^.]+)?|lora\.up|lora_linear_layer\.up|lora_up)\.weight$")


def lora_file(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """The ``.safetensors`` of a LoRA given as a file or a folder (diffusers' file name)."""
    p = Path(os.path.expanduser(str(path)))
    return p / (weight_name or LORA_WEIGHT_NAME) if p.is_dir() else p


def _module(model: Any, dotted: str) -> Any:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        return None


def _fits(model: Any, module_path: str, shape: list[int], down: bool) -> str | None:
    """Why a LoRA matrix of ``shape`` does not fit ``model``'s module, or None."""
    # transformers 5 CLIP state dicts (and so LoRAs made from them) may lack "text_model."
    module = _module(model, module_path) or _module(model, f"text_model.{module_path}")
    if module is None:
        return None  # diffusers maps other key styles itself; only sizes are checked here
    base = getattr(module, "base_layer", module)
    size = getattr(base, "in_features" if down else "out_features", None)
    if size is None:
        size = getattr(base, "in_channels" if down else "out_channels", None)
    theirs = shape[1] if down else shape[0]
    if size is not None and len(shape) >= 2 and theirs != size:
        side = "input" if down else "output"
        return f"{module_path} has {side} size {theirs} in the LoRA but {size} in the model"
    return None


def lora_problem(
    shapes: dict[str, list[int]],
    cross_attention_dim: int | None = None,
    unet: Any = None,
    text_encoder: Any = None,
) -> str | None:
    """Why a LoRA's ``{key: shape}`` does not fit an SD1.5-family base, or ``None``.

    Checks: it holds LoRA matrices at all; no keys only other families have; the UNet's
    cross-attention key/value LoRAs take ``cross_attention_dim`` inputs; with ``unet`` /
    ``text_encoder`` given, every LoRA matrix in diffusers' naming matches its layer's size.
    """
    downs = {k: m.group(1) for k in shapes if (m := _DOWN.match(k))}
    ups = {k: m.group(1) for k in shapes if (m := _UP.match(k))}
    if not downs:
        return "holds no LoRA weights (no lora_A / lora_down matrices)"
    for marker, what in OTHER_FAMILY_MARKERS.items():
        if any(k.startswith(marker) for k in shapes):
            return f"is a LoRA for {what}, not for an SD1.5-family model"
    if cross_attention_dim is not None:
        for key, module in downs.items():
            flat = module.replace(".", "_")
            if "attn2_to_k" in flat or "attn2_to_v" in flat:
                if shapes[key][1] != cross_attention_dim:
                    return (
                        f"was made for a base with text width {shapes[key][1]} (its cross-attention "
                        f"LoRA {key}); this base's is {cross_attention_dim}"
                    )
    for table, down in ((downs, True), (ups, False)):
        for key, module in table.items():
            prefix, _, rest = module.partition(".")
            model = {"unet": unet, "text_encoder": text_encoder}.get(prefix)
            if model is not None:
                why = _fits(model, rest, shapes[key], down)
                if why:
                    return f"does not fit this model: {why}"
    return None


def check_lora(
    path: str | os.PathLike,
    cross_attention_dim: int | None = None,
    unet: Any = None,
    text_encoder: Any = None,
    weight_name: str | None = None,
) -> str | None:
    """:func:`lora_problem` of a LoRA file or folder, plus a missing or unreadable file."""
    file = lora_file(path, weight_name)
    if not file.is_file():
        return f"does not exist (looked for {file})"
    try:
        shapes = read_single_file_header(file)
    except ValueError as err:
        return str(err)
    return lora_problem(shapes, cross_attention_dim, unet, text_encoder)


def load_loras(pipe: Any, specs: Sequence[dict[str, Any]], field: str = "sampler.lora") -> None:
    """Load LoRAs into ``pipe``'s UNet and text encoder (``load_lora_weights``) and set their
    scales (``set_adapters``): ``specs`` = ``[{path: ..., scale: 1.0, weight_name: null}]``.
    A file that does not fit raises ``ValueError`` naming ``field[i]`` before any is loaded."""
    names, scales = [], []
    for i, spec in enumerate(specs):
        why = check_lora(
            spec["path"],
            unet=pipe.unet,
            text_encoder=pipe.text_encoder,
            weight_name=spec.get("weight_name"),
        )
        if why:
            raise ValueError(f"{field}[{i}].path='{spec['path']}' {why}.")
    for i, spec in enumerate(specs):
        name = str(spec.get("name") or f"lora_{i}")
        path = Path(os.path.expanduser(str(spec["path"])))
        kwargs = {"weight_name": path.name} if path.is_file() else {}
        if spec.get("weight_name"):
            kwargs["weight_name"] = spec["weight_name"]
        pipe.load_lora_weights(
            str(path.parent if path.is_file() else path), adapter_name=name, **kwargs
        )
        names.append(name)
        scales.append(float(spec.get("scale", 1.0)))
    if names:
        pipe.set_adapters(names, adapter_weights=scales)


def check_lora_config(key: str, entries: Any, cross_attention_dim: int | None = None) -> None:
    """Preflight of a ``[{path: ..., scale: ...}]`` list at config ``key`` (``sampler.lora``):
    each file exists, holds an SD1.5-family LoRA of the base's text width, and has a finite
    scale. Reads headers only; raises ``ConfigError`` naming ``key.<i>``."""
    import math

    from idgen.utils.validation import ConfigError

    if entries in (None, []):
        return
    if not isinstance(entries, list | tuple):
        raise ConfigError(
            key, entries, "must be a list", f"Pass {key}='[{{path: <file>, scale: 1.0}}]'."
        )
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("path"):
            raise ConfigError(
                f"{key}.{i}", entry, "needs a path", f"Pass {key}='[{{path: <file>, scale: 1.0}}]'."
            )
        scale = entry.get("scale", 1.0)
        if (
            not isinstance(scale, int | float)
            or isinstance(scale, bool)
            or not math.isfinite(scale)
        ):
            raise ConfigError(
                f"{key}.{i}.scale", scale, "must be a finite number", "Pass scale: 1.0."
            )
        why = check_lora(entry["path"], cross_attention_dim, weight_name=entry.get("weight_name"))
        if why:
            raise ConfigError(
                f"{key}.{i}.path",
                str(entry["path"]),
                why,
                "Pass a LoRA trained for this base model (same family and size).",
            )
