"""What a memory plan needs to know of a model: parameter shapes and activation bytes, from
configs alone (the ``meta`` device and fake tensors: no weights, seconds even for SDXL or
SD3.5 Large).

A model comes from one of three places: a diffusers folder (its ``*/config.json``), a true-size
layout (:data:`idgen.models.layouts.TRUE_SIZE`, e.g. ``"sd15"``, ``"sdxl"``, ``"sd35_medium"``)
or an already-built pipeline (the tiny models). What differs between families (the denoiser's
class, the domain model's parameters, one training step's forward) the family answers
(:class:`idgen.models.family.ModelFamily`'s memory-plan methods); a new family plugs in there
and with its layout.
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

from idgen.models.family import FAMILIES, family_of
from idgen.models.layouts import CLIP_VOCAB_SIZE, TRUE_SIZE

#: models below this many denoiser parameters are measured with real tensors (milliseconds)
SMALL_MODEL = 20_000_000


@dataclass
class ModelSizes:
    """Parameter shapes of a base model's parts and the configs to build them on ``meta``.

    ``denoiser_*``: the UNet (SD1.5, SDXL) or the MMDiT transformer (SD3); its buffers (SD3's
    position-embedding table) are held by every copy of it as its weights are.
    """

    family: str  # the model family's name (FAMILIES)
    denoiser_config: dict[str, Any]
    vae_params: int
    text_encoder_params: int
    #: the largest text encoder's parameters (loading copies one component at a time)
    largest_text_encoder: int = 0
    vae_factor: int = 8
    latent_channels: int = 4
    denoiser_shapes: list[tuple[int, ...]] = field(default_factory=list)
    denoiser_buffers: int = 0
    #: shapes of the domain model's trainable parameters (SD1.5/SDXL: cross-attention removed,
    #: E_l added; SD3: the transformer plus its learned context)
    domain_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: activation_bytes results by their arguments (a plan asks for the same ones many times)
    activation_cache: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def denoiser_params(self) -> int:
        return sum(math.prod(s) for s in self.denoiser_shapes)

    @property
    def denoiser_values(self) -> int:
        """Parameters and buffers: the values one copy of the denoiser holds."""
        return self.denoiser_params + self.denoiser_buffers

    @property
    def domain_params(self) -> int:
        return sum(math.prod(s) for s in self.domain_shapes)


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


def _finish(
    family: str, denoiser_config: dict, vae_config: dict, text: list[int], vae_params: int
) -> ModelSizes:
    spec = FAMILIES[family]
    with torch.device("meta"):
        denoiser = spec.denoiser_from_config(denoiser_config)
    return ModelSizes(
        family=family,
        denoiser_config=dict(denoiser.config),
        vae_params=vae_params,
        text_encoder_params=sum(text),
        largest_text_encoder=max(text, default=0),
        vae_factor=2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1),
        latent_channels=int(vae_config.get("latent_channels", 4)),
        denoiser_shapes=[tuple(p.shape) for p in denoiser.parameters()],
        denoiser_buffers=sum(b.numel() for b in denoiser.buffers()),
        domain_shapes=spec.domain_shapes(denoiser),
    )


def sizes_from_layout(name: str) -> ModelSizes:
    """A base model's true size from :data:`~idgen.models.layouts.TRUE_SIZE` (``sd15``,
    ``sdxl``, ``sd3_medium``, ``sd35_medium``, ``sd35_large``)."""
    if name not in TRUE_SIZE:
        raise KeyError(f"no true-size layout {name!r}; known: {sorted(TRUE_SIZE)}")
    layout = TRUE_SIZE[name]
    text = [_meta_params(kind, cfg) for kind, cfg in layout["text_encoders"]]
    vae = _meta_params("vae", layout["vae"])
    return _finish(layout["family"], layout["denoiser"], layout["vae"], text, vae)


def sizes_from_folder(folder: str | Path, family: str | None = None) -> ModelSizes:
    """Sizes from a diffusers folder's ``config.json`` files: the denoiser's (``unet`` or
    ``transformer``), the VAE's and each ``text_encoder*`` the folder has (SD3 without T5:
    two). ``family``: the folder's family, read from its ``model_index.json`` when not given."""
    folder = Path(folder)
    spec = FAMILIES[family] if family is not None else family_of(folder)

    def config(sub: str) -> dict[str, Any]:
        return json.loads((folder / sub / "config.json").read_text())

    vae_config = config("vae")
    text = []
    for sub in sorted(p.name for p in folder.glob("text_encoder*") if p.is_dir()):
        cfg = config(sub)
        kind = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
        text.append(_meta_params(kind, keep))
    denoiser = config(spec.denoiser_name)
    return _finish(spec.name, denoiser, vae_config, text, _meta_params("vae", vae_config))


def sizes_from_pipeline(pipe: Any) -> ModelSizes:
    """Sizes of a built pipeline (e.g. a tiny model), of the family it is."""
    spec = family_of(pipe)
    text = [
        _count(m)
        for name, m in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(m, nn.Module)
    ]
    denoiser = dict(spec.denoiser(pipe).config)
    return _finish(spec.name, denoiser, dict(pipe.vae.config), text, _count(pipe.vae))


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

    ``stage="finetune"``: the domain model trains in float32 (the family's
    :meth:`~idgen.models.family.ModelFamily.plan_step` says what it runs). ``stage="inversion"``:
    only the text features train, the denoiser is frozen in ``frozen_dtype``. With ``checkpointing`` the saved inputs of
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
    train = stage == "finetune"
    # Small models (the tiny test models) run for real: faster than fake tensors' dispatch.
    mode = FakeTensorMode() if sizes.denoiser_params > SMALL_MODEL else contextlib.nullcontext()
    with mode, torch.random.fork_rng(devices=[]):
        previous = torch.get_default_dtype()
        # the trained network is float32 whatever the frozen parts are (fake tensors cannot
        # change dtype after the fact: the model and its inputs are made in this dtype)
        torch.set_default_dtype(torch.float32 if train else frozen_dtype)
        try:
            model, blocks, forward = FAMILIES[sizes.family].plan_step(
                sizes.denoiser_config, batch, latent, train
            )
        finally:
            torch.set_default_dtype(previous)
        model.requires_grad_(train)
        params = {_storage_key(p) for p in model.parameters()}

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

            handles = [b.register_forward_pre_hook(before) for b in blocks]
            handles += [b.register_forward_hook(after) for b in blocks]
            auto = (
                torch.autocast("cpu", dtype=autocast_dtype)
                if autocast_dtype is not None
                else torch.autocast("cpu", enabled=False)
            )
            try:
                with auto, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = forward()
                    total = sum(saved.values()) + out.untyped_storage().nbytes()
            finally:
                for h in handles:
                    h.remove()
            return total, max(per_block, default=0)

        plain, largest_block = run()
        if not checkpointing or not train:
            return int(plain)
        model.enable_gradient_checkpointing()
        kept, _ = run()
        return int(kept + largest_block)
