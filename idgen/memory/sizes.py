"""What a memory plan needs to know of a model: parameter shapes and activation bytes, from
configs alone (the ``meta`` device and fake tensors: no weights, seconds even for SDXL).

A model comes from one of three places: a diffusers folder (its ``*/config.json``), a family's
true-size layout (:data:`idgen.models.layouts.TRUE_SIZE`, e.g. ``"sd15"``, ``"sdxl"``) or an
already-built pipeline (the tiny model). A new family (SD3, ...) plugs in by adding its layout.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idgen.models.layouts import CLIP_VOCAB_SIZE, TRUE_SIZE

#: models below this many UNet parameters are measured with real tensors (milliseconds)
SMALL_MODEL = 20_000_000
#: families whose text conditioning is cross-attention that the null-text UNet replaces
TEXT_TIME = "text_time"


@dataclass
class ModelSizes:
    """Parameter shapes of a base model's parts and the configs to build them on ``meta``."""

    family: str
    unet_config: dict[str, Any]
    vae_params: int
    text_encoder_params: int
    vae_factor: int = 8
    latent_channels: int = 4
    unet_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: shapes of the null-text UNet's trainable parameters (cross-attention removed, E_l added)
    domain_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: activation_bytes results by their arguments (a plan asks for the same ones many times)
    activation_cache: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def unet_params(self) -> int:
        return sum(math.prod(s) for s in self.unet_shapes)

    @property
    def domain_params(self) -> int:
        return sum(math.prod(s) for s in self.domain_shapes)


def _meta_unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**clean)


def _domain_shapes(unet: nn.Module) -> list[tuple[int, ...]]:
    """The null-text UNet's parameters: the UNet's minus attn2/norm2, plus one ``E_l`` per block
    (its width: the block's hidden size); for a text_time UNet the pooled-text input becomes a
    fixed learned vector of the same width."""
    from idgen.models.null_text_unet import removed_prefixes, transformer_blocks

    removed = removed_prefixes(unet)
    shapes = [tuple(p.shape) for n, p in unet.named_parameters() if not n.startswith(removed)]
    shapes += [(b.norm1.normalized_shape[0],) for _, b in transformer_blocks(unet)]
    if unet.config.get("addition_embed_type") == TEXT_TIME:
        pooled = unet.config.projection_class_embeddings_input_dim
        shapes.append((pooled - 6 * unet.config.addition_time_embed_dim,))
    return shapes


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_params(kind: str, config: dict[str, Any]) -> int:
    """Parameters of a VAE or text encoder built on ``meta`` from its config."""
    with torch.device("meta"):
        if kind == "vae":
            from diffusers import AutoencoderKL

            clean = {k: v for k, v in config.items() if not k.startswith("_")}
            return _count(AutoencoderKL(**clean))
        import transformers

        cls = getattr(transformers, kind)
        text_config = cls.config_class(**{"vocab_size": CLIP_VOCAB_SIZE, **config})
        return _count(cls(text_config))


def _finish(family: str, unet_config: dict, vae_config: dict, text_params: int, vae_params: int):
    unet = _meta_unet(unet_config)
    return ModelSizes(
        family=family,
        unet_config=dict(unet.config),
        vae_params=vae_params,
        text_encoder_params=text_params,
        vae_factor=2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1),
        latent_channels=int(vae_config.get("latent_channels", 4)),
        unet_shapes=[tuple(p.shape) for p in unet.parameters()],
        domain_shapes=_domain_shapes(unet),
    )


def sizes_from_layout(family: str) -> ModelSizes:
    """A family's true size from :data:`~idgen.models.layouts.TRUE_SIZE` (``sd15``, ``sdxl``)."""
    if family not in TRUE_SIZE:
        raise KeyError(f"no true-size layout for family {family!r}; known: {sorted(TRUE_SIZE)}")
    layout = TRUE_SIZE[family]
    text = sum(_meta_params(kind, cfg) for kind, cfg in layout["text_encoders"])
    vae = _meta_params("vae", layout["vae"])
    return _finish(family, layout["denoiser"], layout["vae"], text, vae)


def sizes_from_folder(folder: str | Path, family: str = "sd15") -> ModelSizes:
    """Sizes from a diffusers folder's ``unet``/``vae``/``text_encoder*`` ``config.json`` files."""
    folder = Path(folder)

    def config(sub: str) -> dict[str, Any]:
        return json.loads((folder / sub / "config.json").read_text())

    vae_config = config("vae")
    text = 0
    for sub in sorted(p.name for p in folder.glob("text_encoder*") if p.is_dir()):
        cfg = config(sub)
        kind = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
        text += _meta_params(kind, keep)
    return _finish(family, config("unet"), vae_config, text, _meta_params("vae", vae_config))


def sizes_from_pipeline(pipe: Any, family: str = "sd15") -> ModelSizes:
    """Sizes of a built pipeline (e.g. the tiny model)."""
    text = sum(
        _count(m)
        for name, m in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(m, nn.Module)
    )
    return _finish(family, dict(pipe.unet.config), dict(pipe.vae.config), text, _count(pipe.vae))


# ------------------------------------------------------------------------------- activations


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def activation_bytes(
    sizes: ModelSizes,
    batch: int,
    resolution: int,
    *,
    stage: str = "finetune",
    autocast_dtype: torch.dtype | None = None,
    frozen_dtype: torch.dtype = torch.float32,
    checkpointing: bool = False,
) -> int:
    """Bytes autograd keeps for the backward pass of one training step, found by running the
    forward pass on fake tensors (shapes only) and summing the storages it saves.

    ``stage="finetune"``: every UNet weight trains (what the null-text UNet saves; its removed
    cross-attention makes it save slightly less). ``stage="inversion"``: only the text features
    train, the UNet is frozen in ``frozen_dtype``. With ``checkpointing`` the saved inputs of
    the checkpointed blocks plus the largest block's own activations (recomputed one at a
    time in the backward pass).
    """
    if stage == "finetune":
        frozen_dtype = torch.float32  # the trained UNet is float32 whatever the frozen parts are
    key = (batch, resolution, stage, autocast_dtype, frozen_dtype, checkpointing)
    if key not in sizes.activation_cache:
        sizes.activation_cache[key] = _activation_bytes(sizes, *key)
    return sizes.activation_cache[key]


def _activation_bytes(
    sizes: ModelSizes,
    batch: int,
    resolution: int,
    stage: str,
    autocast_dtype: torch.dtype | None,
    frozen_dtype: torch.dtype,
    checkpointing: bool,
) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    latent = resolution // sizes.vae_factor
    config = sizes.unet_config
    # Small models (the tiny test model) run for real: faster than fake tensors' dispatch.
    mode = FakeTensorMode() if sizes.unet_params > SMALL_MODEL else contextlib.nullcontext()
    with mode, torch.random.fork_rng(devices=[]):
        train_unet = stage == "finetune"
        null_text = train_unet and config.get("addition_embed_type") != TEXT_TIME
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if train_unet else frozen_dtype)
        try:  # (fake tensors cannot change dtype after the fact)
            model = _fake_model(config, null_text)
        finally:
            torch.set_default_dtype(previous)
        unet = model.unet if null_text else model
        model.requires_grad_(train_unet)
        params = {_storage_key(p) for p in model.parameters()}
        dtype = torch.float32 if train_unet else frozen_dtype
        sample = torch.randn(batch, sizes.latent_channels, latent, latent, dtype=dtype)
        context = torch.randn(batch, 77, config["cross_attention_dim"], dtype=dtype)
        context.requires_grad_(not train_unet)
        added = None
        if config.get("addition_embed_type") == TEXT_TIME:
            pooled = (
                config["projection_class_embeddings_input_dim"]
                - 6 * config["addition_time_embed_dim"]
            )
            added = {
                "text_embeds": torch.randn(batch, pooled, dtype=dtype),
                "time_ids": torch.randn(batch, 6, dtype=dtype),
            }
        timestep = torch.full((batch,), 500)

        def run() -> tuple[int, int]:
            saved: dict[int, int] = {}
            per_block: list[int] = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                key = _storage_key(t)
                if key not in params:
                    saved[key] = t.untyped_storage().nbytes()
                return t

            def before(*_):
                per_block.append(-sum(saved.values()))

            def after(*_):
                per_block[-1] += sum(saved.values())

            blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
            handles = [b.register_forward_pre_hook(before) for b in blocks]
            handles += [b.register_forward_hook(after) for b in blocks]
            auto = (
                torch.autocast("cpu", dtype=autocast_dtype)
                if autocast_dtype is not None
                else torch.autocast("cpu", enabled=False)
            )
            try:
                with auto, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    if null_text:
                        out = model(sample, timestep)
                    else:
                        out = model(
                            sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added
                        )
                    total = sum(saved.values()) + out.sample.untyped_storage().nbytes()
            finally:
                for h in handles:
                    h.remove()
            return total, max(per_block, default=0)

        plain, largest_block = run()
        if not checkpointing or not train_unet:
            return int(plain)
        model.enable_gradient_checkpointing()
        kept, _ = run()
        return int(kept + largest_block)


def _fake_model(config: dict[str, Any], null_text: bool) -> nn.Module:
    """The UNet (or its null-text version) built under the active fake mode (its init runs on
    fake tensors, so it takes no memory), or for real when no fake mode is active."""
    from diffusers import UNet2DConditionModel

    from idgen.models.null_text_unet import NullTextUNet

    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return NullTextUNet(unet_config=clean) if null_text else UNet2DConditionModel(**clean)
