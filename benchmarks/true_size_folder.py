"""A diffusers folder in a model's true layout (:data:`idgen.models.layouts.TRUE_SIZE`), written
without ever holding the model: each component is built on ``meta`` and its weights are drawn
and written one shard at a time (at most ``shard_bytes`` of real tensors in memory).

    python benchmarks/true_size_folder.py --layout sdxl --out /tmp/sdxl_true            # weights
    python benchmarks/true_size_folder.py --layout sdxl --out /tmp/sdxl_cfg --configs-only

``--configs-only`` writes the configs, tokenizers and scheduler with an empty placeholder
weight file per model (the folder passes idgen's folder check and is planned from its configs;
loading it fails at once): what a test of a run refused before loading needs. The weights are
random (seeded): matrices ``N(0, 1/fan_in)``, norm scales 1, biases 0; the tokenizers are the
tiny offline CLIP tokenizer (ids within every CLIP vocabulary). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

SHARD_BYTES = 1_000_000_000


def _random_like(name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator):
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) < 2:  # norm scales (and other vectors): 1
        return torch.ones(shape, dtype=dtype)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen) * fan_in**-0.5).to(dtype)


def write_weights(
    module: torch.nn.Module,
    out: Path,
    stem: str,
    dtype: torch.dtype,
    seed: int,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """``module``'s state dict (shapes from ``meta``) as random sharded safetensors under
    ``out``: ``<stem>-0000i-of-0000n.safetensors`` and ``<stem>.safetensors.index.json``, as
    diffusers' and transformers' ``save_pretrained`` name them."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * item
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {k: _random_like(k, state[k].shape, dtype, gen) for k in keys}
        save_file(shard, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * item for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_folder(
    layout_name: str,
    out: Path,
    *,
    weights: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """The layout as a diffusers folder ``StableDiffusion*Pipeline.from_pretrained`` loads."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    from idgen.models.family import FAMILIES
    from idgen.models.layouts import CLIP_VOCAB_SIZE, TRUE_SIZE
    from idgen.models.tiny_sd3 import SD3_SCHEDULER_JSON
    from idgen.models.tiny_sdxl import SDXL_SCHEDULER_JSON
    from idgen.models.tokenizer import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

    layout = TRUE_SIZE[layout_name]
    family = FAMILIES[layout["family"]]
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "_class_name": family.txt2img.__name__,
        "_diffusers_version": diffusers.__version__,
    }

    def model(sub: str, built: torch.nn.Module, library: str, stem: str) -> None:
        folder = out / sub
        folder.mkdir(exist_ok=True)
        if library == "diffusers":
            built.save_config(folder)
        else:  # (what PreTrainedModel.save_pretrained records: the class to build)
            built.config.architectures = [type(built).__name__]
            built.config.save_pretrained(folder)
        if weights:
            write_weights(built, folder, stem, dtype, seed + len(index))
        else:
            (folder / f"{stem}.safetensors").write_bytes(b"")  # a placeholder, not loadable
        index[sub] = [library, type(built).__name__]

    with torch.device("meta"):
        denoiser = family.denoiser_from_config(layout["denoiser"])
        vae = AutoencoderKL(**{k: v for k, v in layout["vae"].items() if k[0] != "_"})
    model(family.denoiser_name, denoiser, "diffusers", "diffusion_pytorch_model")
    model("vae", vae, "diffusers", "diffusion_pytorch_model")
    del denoiser, vae
    for i, (kind, config) in enumerate(layout["text_encoders"]):
        suffix = "" if i == 0 else f"_{i + 1}"
        cls = getattr(transformers, kind)
        with torch.device("meta"):
            encoder = cls(cls.config_class(**{"vocab_size": CLIP_VOCAB_SIZE, **config}))
        model(f"text_encoder{suffix}", encoder, "transformers", "model")
        tokenizer = (
            build_tiny_clip_tokenizer if kind.startswith("CLIP") else build_tiny_t5_tokenizer
        )()
        if tokenizer is not None:
            tokenizer.save_pretrained(out / f"tokenizer{suffix}")
            index[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
    scheduler_class, scheduler_config = {
        "sd15": ("PNDMScheduler", {}),
        "sdxl": ("EulerDiscreteScheduler", SDXL_SCHEDULER_JSON),
        "sd3": ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER_JSON),
    }[family.name]
    scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    scheduler.save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", scheduler_class]
    for name in family.components:  # optional parts the pipeline takes: none
        index.setdefault(name, [None, None])
    if family.name == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
        index["requires_safety_checker"] = False
    if family.name == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", required=True, help="a TRUE_SIZE name: sd15, sdxl, sd35_medium")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs-only", action="store_true", help="placeholder weight files")
    parser.add_argument("--dtype", default="bfloat16", help="weights' dtype on disk")
    args = parser.parse_args()
    from idgen.utils.dtypes import parse_dtype

    write_folder(
        args.layout,
        args.out,
        weights=not args.configs_only,
        dtype=parse_dtype(args.dtype, "--dtype"),
    )
    print(args.out)


if __name__ == "__main__":
    main()
