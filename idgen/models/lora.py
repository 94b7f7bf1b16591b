"""LoRA files for the frozen SD: does a file fit the base, and loading a list of them.

``lora_problem`` reads a ``.safetensors`` header only (no tensors), so preflight can refuse a
LoRA made for another base (parts the base's family lacks, such as SDXL's second text encoder
on SD1.5 or a transformer LoRA on a UNet base, another text width, other layer sizes)
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
# The pipeline components a LoRA may act on. A diffusers / peft key starts with one of them
# ("text_encoder_2.<module>..."); a kohya key with its "lora_<part>_" prefix.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_transformer_": "transformer",
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


def lora_targets(shapes: dict[str, Any]) -> set[str]:
    """The pipeline components (:data:`LORA_COMPONENTS`) a LoRA's keys act on."""
    found = set()
    for key in shapes:
        head = key.split(".", 1)[0]
        if head in LORA_COMPONENTS:
            found.add(head)
        for prefix, component in _KOHYA_PREFIXES.items():
            if key.startswith(prefix):
                found.add(component)
    return found


def _family_problem(targets: set[str], family: str) -> str | None:
    """Why a LoRA acting on ``targets`` cannot be for a ``family`` base (a part the family's
    pipelines do not have, such as SDXL's ``text_encoder_2`` on SD1.5), naming its family."""
    from idgen.models.family import FAMILIES, family_named  # diffusers: only when a LoRA is read

    parts = set(family_named(family).components)
    foreign = sorted(targets - parts)
    if not foreign:
        return None
    owners = [f.name.upper() for f in FAMILIES.values() if targets <= set(f.components)]
    what = " / ".join(owners) if owners else "another kind of model"
    return (
        f"is a LoRA for {what} (it has {', '.join(foreign)} weights), not for an "
        f"{family.upper()} base"
    )


def lora_problem(
    shapes: dict[str, list[int]],
    cross_attention_dim: int | None = None,
    unet: Any = None,
    text_encoder: Any = None,
    *,
    family: str = "sd15",
    models: dict[str, Any] | None = None,
) -> str | None:
    """Why a LoRA's ``{key: shape}`` does not fit a base of ``family`` (``model.family``), or None.

    Checks: it holds LoRA matrices at all; it acts only on parts the family's pipelines have
    (an SDXL LoRA's ``text_encoder_2`` on SD1.5, a transformer LoRA on a UNet base); the UNet's
    cross-attention key/value LoRAs take ``cross_attention_dim`` inputs (another family's or
    size's text width); with the models given (``unet``, ``text_encoder``, or ``models`` by
    component name, e.g. ``text_encoder_2``), every LoRA matrix in diffusers' or peft's naming
    matches its layer's size.
    """
    downs = {k: m.group(1) for k in shapes if (m := _DOWN.match(k))}
    ups = {k: m.group(1) for k in shapes if (m := _UP.match(k))}
    if not downs:
        return "holds no LoRA weights (no lora_A / lora_down matrices)"
    why = _family_problem(lora_targets(shapes), family)
    if why:
        return why
    if cross_attention_dim is not None:
        for key, module in downs.items():
            flat = module.replace(".", "_")
            if "attn2_to_k" in flat or "attn2_to_v" in flat:
                if shapes[key][1] != cross_attention_dim:
                    return (
                        f"was made for a base with text width {shapes[key][1]} (its cross-attention "
                        f"LoRA {key}); this base's is {cross_attention_dim}"
                    )
    by_part = {"unet": unet, "text_encoder": text_encoder, **(models or {})}
    for table, down in ((downs, True), (ups, False)):
        for key, module in table.items():
            prefix, _, rest = module.partition(".")
            model = by_part.get(prefix)
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
    *,
    family: str = "sd15",
    models: dict[str, Any] | None = None,
) -> str | None:
    """:func:`lora_problem` of a LoRA file or folder, plus a missing or unreadable file."""
    file = lora_file(path, weight_name)
    if not file.is_file():
        return f"does not exist (looked for {file})"
    try:
        shapes = read_single_file_header(file)
    except ValueError as err:
        return str(err)
    return lora_problem(
        shapes, cross_attention_dim, unet, text_encoder, family=family, models=models
    )


def pipe_lora_problem(
    pipe: Any, source: Any, weight_name: str | None = None, family: str | None = None
) -> str | None:
    """Why a LoRA (local file or folder, or state dict) does not fit ``pipe``'s models (every
    component a LoRA may act on, in ``pipe``'s family), or None; a hub id is left to diffusers."""
    import torch

    from idgen.models.family import family_of

    family = family or family_of(pipe).name
    models = {name: getattr(pipe, name, None) for name in LORA_COMPONENTS}
    models = {name: m for name, m in models.items() if m is not None}
    if isinstance(source, dict):
        shapes = {k: list(v.shape) for k, v in source.items() if isinstance(v, torch.Tensor)}
        return lora_problem(shapes, family=family, models=models)
    if Path(os.path.expanduser(str(source))).exists():
        return check_lora(source, weight_name=weight_name, family=family, models=models)
    return None


def load_loras(pipe: Any, specs: Sequence[dict[str, Any]], field: str = "sampler.lora") -> None:
    """Load LoRAs into ``pipe``'s UNet and text encoder (``load_lora_weights``) and set their
    scales (``set_adapters``): ``specs`` = ``[{path: ..., scale: 1.0, weight_name: null}]``.
    A file that does not fit raises ``ValueError`` naming ``field[i]`` before any is loaded."""
    names, scales = [], []
    for i, spec in enumerate(specs):
        path = Path(os.path.expanduser(str(spec["path"])))
        why = (
            pipe_lora_problem(pipe, path, spec.get("weight_name"))
            if path.exists()
            else f"does not exist (looked for {path})"
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


def check_lora_config(
    key: str, entries: Any, cross_attention_dim: int | None = None, family: str = "sd15"
) -> None:
    """Preflight of a ``[{path: ..., scale: ...}]`` list at config ``key`` (``sampler.lora``):
    each file exists, holds a LoRA for the base's ``family`` and text width, and has a finite
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
        why = check_lora(
            entry["path"],
            cross_attention_dim,
            weight_name=entry.get("weight_name"),
            family=family,
        )
        if why:
            raise ConfigError(
                f"{key}.{i}.path",
                str(entry["path"]),
                why,
                "Pass a LoRA trained for this base model (same family and size).",
            )
