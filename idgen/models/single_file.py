"""SD1.5 single files: one ``.safetensors`` in the original (ldm) layout, as community
checkpoints ship, written from and read back into diffusers models.

diffusers reads such a file with ``from_single_file`` (its ``single_file_utils`` map ldm keys to
diffusers keys, with the geometry taken from a diffusers config). :func:`to_original_layout` is
the inverse map, for any SD1.5-family geometry (any number of levels and ``layers_per_block``),
so a model made here (the tiny one, a fine-tuned one) can be saved the way community
checkpoints are. :func:`read_single_file_header` looks at a file's keys and shapes without
reading its tensors (what preflight needs to refuse a wrong file before heavy work).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where weights are read: the config checks need only headers
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# Keys that mark other families' single files (SDXL's two text encoders, SD3's MMDiT).
OTHER_FAMILY_MARKERS = {
    "conditioner.embedders.": "an SDXL checkpoint",
    "model.diffusion_model.joint_blocks.": "an SD3 checkpoint",
    "text_encoders.": "an SD3 checkpoint",
    "cond_stage_model.model.": "an SD2 (OpenCLIP) checkpoint",
}
# In-dimension of the first cross-attention key projection: the text width of the UNet.
CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"

_RESNET = {  # diffusers ResnetBlock2D name -> ldm ResBlock name
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {  # diffusers Attention name -> ldm AttnBlock name (1x1 convs there)
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _split(key: str, prefix: str) -> str | None:
    return key[len(prefix) :] if key.startswith(prefix) else None


def _rename(key: str, table: dict[str, str]) -> str:
    module, _, leaf = key.rpartition(".")
    return f"{table.get(module, module)}.{leaf}"


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in ldm key names (no prefix)."""
    lpb = int(config["layers_per_block"])
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            block, kind, index = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if parts[0] == "down_blocks":
                if kind == "downsamplers":  # the level's last input block: a strided conv "op"
                    new = f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op.{rest.split('.', 1)[1]}"
                else:
                    slot = "0" if kind == "resnets" else "1"
                    rest = _rename(rest, _RESNET) if kind == "resnets" else rest
                    new = f"input_blocks.{1 + block * (lpb + 1) + index}.{slot}.{rest}"
            elif kind == "upsamplers":  # after the level's last resnet (and attention, if any)
                slot = 2 if up_has_attention[block] else 1
                new = f"output_blocks.{block * (lpb + 1) + lpb}.{slot}.conv.{rest.split('.', 1)[1]}"
            else:
                slot = "0" if kind == "resnets" else "1"
                rest = _rename(rest, _RESNET) if kind == "resnets" else rest
                new = f"output_blocks.{block * (lpb + 1) + index}.{slot}.{rest}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename(rest, _RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            new = _rename(key, _UNET_FIXED)
        out[new] = value
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in ldm key names (no prefix)."""
    levels = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        coder = parts[0]
        if coder in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            ldm_level = level if coder == "encoder" else levels - 1 - level  # decoder is reversed
            name = "down" if coder == "encoder" else "up"
            kind, rest = parts[3], ".".join(parts[4:])
            if kind == "resnets":
                index, rest = rest.split(".", 1)
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                new = f"{coder}.{name}.{ldm_level}.block.{index}.{rest}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if coder == "encoder" else "upsample"
                new = f"{coder}.{name}.{ldm_level}.{sampler}.{rest.split('.', 1)[1]}"
        elif coder in ("encoder", "decoder") and parts[1] == "mid_block":
            kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = (
                    f"{coder}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
                )
            else:
                new = f"{coder}.mid.attn_1.{_rename(rest, _VAE_ATTENTION)}"
                if value.ndim == 2:  # linear -> the 1x1 conv of the original
                    value = value[:, :, None, None]
        elif coder in ("encoder", "decoder") and parts[1] == "conv_norm_out":
            new = f"{coder}.norm_out.{parts[2]}"
        else:
            new = key
        out[new] = value
    return out


def text_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` state dict in the original names: ``text_model.*`` (transformers 5
    drops that prefix in ``state_dict()``; original files and diffusers' loader keep it)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def to_original_layout(unet: Any, vae: Any, text_encoder: Any) -> dict[str, torch.Tensor]:
    """One state dict in the original SD1.x single-file layout (UNet, VAE, CLIP text encoder)."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    out.update(
        {VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()}
    )
    out.update({TEXT_PREFIX + k: v for k, v in text_to_original(text_encoder.state_dict()).items()})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_single_file(pipe: Any, path: str | os.PathLike) -> Path:
    """Save an SD1.5-layout pipeline's UNet, VAE and text encoder as one original-layout
    ``.safetensors`` (what ``StableDiffusionPipeline.from_single_file`` reads)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(to_original_layout(pipe.unet, pipe.vae, pipe.text_encoder), str(path))
    return path


def read_single_file_header(path: str | os.PathLike) -> dict[str, list[int]]:
    """``{key: shape}`` of a ``.safetensors`` file, from its JSON header only (no tensors read).

    Raises ``ValueError`` when the file is not a readable safetensors file.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is not a readable .safetensors file ({err})") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def sd15_single_file_problem(shapes: dict[str, list[int]]) -> str | None:
    """Why a single file's ``{key: shape}`` is not an SD1.x checkpoint (UNet, VAE and CLIP text
    encoder in the original layout), or ``None`` when it is one."""
    for marker, what in OTHER_FAMILY_MARKERS.items():
        if any(k.startswith(marker) for k in shapes):
            return f"holds {what}, not an SD1.5-family one"
    missing = [
        name
        for prefix, name in (
            (UNET_PREFIX, "UNet (model.diffusion_model.*)"),
            (VAE_PREFIX, "VAE (first_stage_model.*)"),
            (TEXT_PREFIX, "CLIP text encoder (cond_stage_model.transformer.*)"),
        )
        if not any(k.startswith(prefix) for k in shapes)
    ]
    if missing:
        return "is not an SD1.5 single-file checkpoint: no " + ", no ".join(missing)
    return None


def single_file_cross_attention_dim(shapes: dict[str, list[int]]) -> int | None:
    """The UNet's text width (768 on SD1.5) read from a single file's shapes."""
    shape = shapes.get(CROSS_ATTENTION_KEY)
    return int(shape[1]) if shape and len(shape) == 2 else None


SINGLE_FILE_SUFFIXES = (".safetensors",)
# The diffusers config an SD1.x single file is read with when none is given (diffusers' own
# default for "v1" files); offline it must be in the local hub cache.
SD15_SINGLE_FILE_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def is_single_file(pretrained: str | os.PathLike) -> bool:
    """Whether ``pretrained`` names one checkpoint file (not a diffusers folder or hub id)."""
    return str(pretrained).lower().endswith((*SINGLE_FILE_SUFFIXES, ".ckpt"))


def single_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an SD1.5-family single file (missing, a pickle, not
    safetensors, another family), or ``None``; reads the header only."""
    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        return "does not exist"
    if file.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return (
            "is a pickled checkpoint; single files are read as .safetensors only (a pickle can "
            "run code): convert it, or pass a diffusers folder"
        )
    try:
        return sd15_single_file_problem(read_single_file_header(file))
    except ValueError as err:
        return str(err)


def load_single_file(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> Any:
    """An SD1.5-family single ``.safetensors`` (original layout, as community checkpoints ship)
    as a ``StableDiffusionPipeline``, through diffusers' ``from_single_file``.

    ``config``: a diffusers SD1.5 folder (or hub id) that gives the geometry, tokenizer and
    scheduler; default diffusers' SD1.5 repo, which offline must be in the local hub cache.
    Raises ``SDLoadError`` (one line) for a file that is not an SD1.5 checkpoint or a config
    that does not fit it.
    """
    from diffusers import StableDiffusionPipeline

    from idgen.models.loading import (
        NO_SAFETY_CHECKER,
        SDLoadError,
        _offline,
        missing_parts,
        own_weights,
    )

    file = Path(os.path.expanduser(str(path)))
    problem = single_file_problem(file)
    if problem:
        raise SDLoadError(f"model.pretrained='{file}' {problem}.")
    config = os.path.expanduser(str(config or SD15_SINGLE_FILE_CONFIG))
    if Path(config).exists():
        missing = missing_parts(config)
        if missing:
            raise SDLoadError(
                f"model.config='{config}' is not a diffusers SD1.5 folder (missing "
                f"{', '.join(missing)}); a single file needs one for its geometry, tokenizer "
                "and scheduler."
            )
        local_files_only = True
    elif local_files_only is None:
        local_files_only = _offline()
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(file),
            config=config,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
            **NO_SAFETY_CHECKER,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SDLoadError(
            f"model.pretrained='{file}' could not be read with the diffusers config '{config}' "
            f"({first}); pass model.config=<a local diffusers SD1.5 folder> of the same geometry."
        ) from err
    import torch

    own_weights(*(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_single_file_models(path: str | os.PathLike, like: Any) -> tuple[Any, Any]:
    """The UNet and CLIP text encoder of an SD1.5 single file, in the geometry of the loaded
    pipeline ``like`` (a community checkpoint as a guidance term: no config folder needed).

    Raises ``ValueError`` naming the file when it is not an SD1.5 checkpoint or its tensors do
    not fit ``like``'s layers.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
    )
    from safetensors.torch import load_file

    problem = single_file_problem(path)
    if problem:
        raise ValueError(f"'{path}' {problem}.")
    checkpoint = load_file(str(Path(os.path.expanduser(str(path)))))
    unet = UNet2DConditionModel.from_config(like.unet.config)
    text_encoder = type(like.text_encoder)(like.text_encoder.config)
    text_state = convert_ldm_clip_checkpoint(checkpoint)
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    try:
        unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, like.unet.config))
        missing, unexpected = text_encoder.load_state_dict(text_state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(
                f"text encoder keys missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"'{path}' does not fit the base model's layers ({' '.join(first[:2])[:300]}); "
            "pass a checkpoint of the base's family and size."
        ) from None
    dtype = like.unet.dtype
    return unet.to(dtype).eval(), text_encoder.to(like.text_encoder.dtype).eval()


def check_single_file_config(
    key: str, pretrained: Any, config: Any = None, family: str = "sd15"
) -> dict[str, Any]:
    """Preflight of ``model.pretrained=<file.safetensors>`` (``key``) and ``model.config``: the
    file is an SD1.5-family single file whose text width fits the config folder's UNet. Reads
    headers and JSON only; raises ``ConfigError``; returns the base geometry (as
    ``idgen.preflight.base_geometry``)."""
    from idgen.models.loading import missing_parts
    from idgen.utils.validation import ConfigError

    if family != "sd15":
        raise ConfigError(
            key,
            str(pretrained),
            f"is a single file; they are read for sd15 only, not {family}",
            "Convert it to a diffusers folder, or use model=sd15.",
        )
    problem = single_file_problem(pretrained)
    if problem:
        raise ConfigError(key, str(pretrained), problem, "Pass an SD1.5-family .safetensors file.")
    shapes = read_single_file_header(Path(os.path.expanduser(str(pretrained))))
    width = single_file_cross_attention_dim(shapes)
    geometry: dict[str, Any] = {"name": str(pretrained), "family": family, "vae_factor": 8}
    if width is not None:
        geometry["cross_attention_dim"] = width
    config_key = key.rsplit(".", 1)[0] + ".config"
    if config is None or not Path(os.path.expanduser(str(config))).exists():
        return geometry  # a hub id (or diffusers' default), resolved when loading
    folder = Path(os.path.expanduser(str(config)))
    missing = missing_parts(folder)
    if missing:
        raise ConfigError(
            config_key,
            str(config),
            f"is not a diffusers SD1.5 folder (missing {', '.join(missing)})",
            "Pass the diffusers folder whose geometry the single file has (model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/).",
        )
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    if width is not None and unet.get("cross_attention_dim") not in (None, width):
        raise ConfigError(
            key,
            str(pretrained),
            f"has text width {width}, but {config_key}='{config}' has "
            f"{unet.get('cross_attention_dim')}",
            f"Pass a {config_key} folder of the same model size.",
        )
    geometry["vae_factor"] = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
    for field in ("in_channels", "sample_size", "cross_attention_dim"):
        if unet.get(field) is not None:
            geometry[field] = unet[field]
    return geometry
