"""Export a trained baseline to a folder plain diffusers can load, and load it back.

Folder layout (one of, per method) + ``idgen_baseline.json`` (method, prompt, token, counts):

- finetune:          ``unet/`` (``UNet2DConditionModel.from_pretrained``)
- finetune_lora:     ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``)
- textual_inversion: ``learned_embeds.safetensors`` (``pipe.load_textual_inversion``)
- custom_diffusion:  ``pytorch_custom_diffusion_weights.bin`` (``pipe.unet.load_attn_procs``)
                     + ``learned_embeds.safetensors``
- oft:               ``adapter_config.json`` + ``adapter_model.safetensors`` (peft OFT adapter)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from idgen.baselines.methods import BaselineMethod, method_class
from idgen.utils.io import replace_dir

METADATA_FILE = "idgen_baseline.json"
EMBEDS_FILE = "learned_embeds.safetensors"


def export_baseline(
    out_dir: str | os.PathLike,
    method: BaselineMethod,
    unet: Any,
    token_vectors: torch.Tensor | None = None,
    metadata: dict | None = None,
    pipeline_class: type | None = None,
) -> Path:
    """Write ``method``'s adaptation of ``unet`` (and the learned token) to ``out_dir``.

    The folder appears complete or not at all (written to a temp folder, then renamed).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if (token_vectors is None) != (method.token is None):
        raise ValueError(
            f"{method.name}: token_vectors must be given exactly when the method learns a token"
        )
    meta = dict(metadata or {})
    meta.update(method=method.name, method_config=method.config(), token=method.token)
    meta["num_vectors"] = method.num_vectors
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        method.save_unet(unet, tmp, pipeline_class)
        if token_vectors is not None:
            # diffusers' format: one key -> [num_vectors, D]; loads as <v>, <v>_1, ...
            vectors = token_vectors.detach().float().cpu().contiguous()
            save_file({method.token: vectors}, tmp / EMBEDS_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"'{folder}' is not an idgen baseline export: {METADATA_FILE} is missing. Export one "
            "with idgen.baselines.export_baseline (written at the end of baseline training)."
        )
    return json.loads(path.read_text())


def load_baseline_pipeline(folder: str | os.PathLike, base_pipeline: Any) -> Any:
    """A new pipeline of ``base_pipeline``'s family (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``): ``base_pipeline`` with the exported baseline applied.

    ``base_pipeline`` is left untouched (its UNet stays the frozen SD one, e.g. for
    unconditional guidance rectification); components the method changes are copied first.
    An export trained on a base of another family is one ``ValueError`` line.
    """
    from idgen.models.family import family_of

    folder = Path(folder)
    meta = read_metadata(folder)
    family = family_of(base_pipeline)
    trained_on = meta.get("family", "sd15")  # exports from before families were recorded
    if trained_on != family.name:
        raise ValueError(
            f"baseline export '{folder}' was trained on a {trained_on} base; this base is "
            f"{family.name}: sample it with a base of its family (model={trained_on})."
        )
    method = method_class(meta["method"])
    learns_token = meta.get("token") is not None
    changes_unet = method.name != "textual_inversion"
    # copies of what the adaptation changes; the frozen rest is shared with the base
    parts = {"scheduler": base_pipeline.scheduler}
    if learns_token:
        parts["text_encoder"] = copy.deepcopy(base_pipeline.text_encoder)
        parts["tokenizer"] = copy.deepcopy(base_pipeline.tokenizer)
    if changes_unet and method.name != "finetune":
        parts["unet"] = copy.deepcopy(base_pipeline.unet)
    pipe = family.txt2img.from_pipe(base_pipeline, **parts)
    method.load_unet(folder, pipe, meta.get("method_config", {}))
    if learns_token:
        pipe.load_textual_inversion(folder, weight_name=EMBEDS_FILE, token=meta["token"])
    return pipe
