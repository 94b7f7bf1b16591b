"""Load Stable Diffusion 1.5 (or any SD1.5-family checkpoint) as a diffusers pipeline."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from idgen.utils.dtypes import parse_optional_dtype
from idgen.utils.validation import UserInputError

# What a diffusers folder in SD1.5 layout must hold for idgen to use it.
REQUIRED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HOW_TO_GET = (
    "Download SD1.5 in diffusers layout on a machine with internet, e.g. "
    "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir <folder> "
    '--exclude "*.ckpt" "safety_checker/*"`, then copy the folder here and pass its path '
    "(model.pretrained=<folder>)."
)


class SDLoadError(UserInputError, FileNotFoundError):
    """A Stable Diffusion folder or hub id could not be loaded (a user error: one line, exit 2)."""


# What idgen's SD pipelines leave out: no safety checker (research on a user's own domain;
# diffusers warns without this flag) and so no feature extractor for it.
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None}


def sd_pipeline(
    vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any
) -> StableDiffusionPipeline:
    """diffusers' ``StableDiffusionPipeline`` over these parts, as :func:`load_sd` makes it:
    no safety checker, progress bar off."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        **NO_SAFETY_CHECKER,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_like_path(path_or_id: str) -> bool:
    p = str(path_or_id)
    return (
        p.startswith(("/", ".", "~"))
        or os.sep in p.rstrip(os.sep).split("/", 1)[-1]
        or p.count("/") != 1
        or Path(p).exists()
    )


def missing_parts(
    folder: str | Path, components: tuple[str, ...] = REQUIRED_COMPONENTS
) -> list[str]:
    """What a diffusers folder lacks of ``components`` (default SD1.5's); empty: complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["the folder itself"]
    missing = []
    if not (folder / "model_index.json").is_file():
        missing.append("model_index.json")
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
            continue
        if name.startswith("tokenizer"):
            if not (sub / "vocab.json").is_file() and not (sub / "tokenizer.json").is_file():
                missing.append(f"{name}/vocab.json (or tokenizer.json)")
        elif name == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append(f"{name}/scheduler_config.json")
        else:
            if not (sub / "config.json").is_file():
                missing.append(f"{name}/config.json")
            if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in sub.iterdir()):
                missing.append(f"{name}/ weights (*.safetensors or *.bin)")
    return missing


def own_weights(*modules: torch.nn.Module) -> None:
    """Give every parameter and buffer of ``modules`` memory of its own (a fresh, aligned copy).

    diffusers' ``from_pretrained`` assigns the tensors of a memory-mapped safetensors file as
    they are: views at the file's byte offsets, often not 64-byte aligned. CPU kernels
    (oneDNN/MKL) take other code paths on unaligned memory and sum in another order, so a
    reloaded model's outputs were ~1e-6 away from the saved model's. With copies a save/load
    round trip is bit-exact, and the file mapping is released.
    """
    with torch.no_grad():
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _no_loading_bar(off: bool):
    """diffusers' "Loading pipeline components..." and transformers' "Loading weights" bars off
    while ``off`` (a local folder loads in seconds; the bars said nothing a user could act on).
    The global settings are restored."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [diffusers_logging, transformers_logging]
    was_on = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries if off else ():
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(libraries, was_on, strict=True):
            if on:
                lib.enable_progress_bar()


def load_sd(
    pretrained: str | os.PathLike,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    family: str = "sd15",
    config: str | os.PathLike | None = None,
) -> StableDiffusionPipeline:
    """Load a pipeline of model ``family`` (``sd15``, ``sdxl``: its diffusers ``txt2img`` class)
    from a local folder or a hub id.

    The safety checker (SD1.5) and the watermark (SDXL) are left out. A local folder of another
    family (read from its ``model_index.json``) raises ``FamilyError`` before anything loads.
    Offline (``HF_HUB_OFFLINE=1``) a missing or incomplete folder raises ``SDLoadError`` naming
    the path, what is missing and how to get the weights. ``pretrained`` may also be one
    original-layout SD1.5 ``.safetensors`` (a community checkpoint), read with the diffusers
    folder ``config`` (:func:`idgen.models.single_file.load_single_file`).
    """
    from idgen.models.family import check_folder_family, family_named
    from idgen.models.single_file import is_single_file, load_single_file

    spec = family_named(family)
    torch_dtype = parse_optional_dtype(torch_dtype, "model.torch_dtype")
    if is_single_file(pretrained):
        if spec.name != "sd15":
            raise SDLoadError(
                f"model.pretrained='{pretrained}': single files are read for the sd15 family "
                f"only; convert this {spec.name} checkpoint to a diffusers folder."
            )
        pipe = load_single_file(pretrained, config, torch_dtype, local_files_only)
        return pipe.to(device) if device is not None else pipe
    source = os.path.expanduser(str(pretrained))
    is_local = Path(source).exists() or _looks_like_path(source)
    if is_local:
        check_folder_family(source, spec)
        missing = missing_parts(source, spec.components)
        if missing:
            raise SDLoadError(
                f"Stable Diffusion folder '{source}' is not usable: missing {', '.join(missing)}. "
                + _HOW_TO_GET
            )
        local_files_only = True
    elif local_files_only is None:
        local_files_only = _offline()
    try:
        with _no_loading_bar(is_local):
            pipe = spec.txt2img.from_pretrained(
                source,
                torch_dtype=torch_dtype,
                variant=variant,
                **spec.load_kwargs_for(source),
                local_files_only=local_files_only,
            )
    except (OSError, ValueError) as err:
        where = "the local cache (offline)" if local_files_only else "the hub"
        raise SDLoadError(
            f"Could not load Stable Diffusion '{source}' from {where}: {err}. " + _HOW_TO_GET
        ) from err
    own_weights(*(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)))
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe
