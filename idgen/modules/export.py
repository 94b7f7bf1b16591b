"""Export a trained domain model folder: NullTextUNet weights + text features + metadata.

From a training checkpoint: ``python -m idgen.modules.export CKPT OUT_DIR [--no-ema]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from idgen.models.domain_models import DOMAIN_MODEL_CLASSES
from idgen.models.null_text_unet import NullTextUNet
from idgen.modules.sd_parts import TEXT_FEATURES_FILE, save_text_features
from idgen.utils.io import replace_dir

METADATA_FILE = "idgen_domain.json"
_README = """# idgen domain model

A null-text domain UNet (paper: "Image is All You Need to Empower Large-scale Diffusion Models
for In-Domain Generation", §3.3) trained by idgen.

```python
from idgen.models import NullTextUNet
domain = NullTextUNet.from_pretrained("{name}")
eps_d = domain(latents, t).sample   # domain guidance, no text input
```

Metadata: `{meta}`. Text features (the stage-1 result the embeddings started from):
`{features}`.
"""


def export_domain_model(
    unet: NullTextUNet,
    out_dir: str | os.PathLike,
    text_features: torch.Tensor | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``unet`` (as given: swap EMA weights in first) and its text features to ``out_dir``.

    The folder loads with ``NullTextUNet.from_pretrained(out_dir)`` alone; it appears complete or
    not at all (written to a temp folder, then renamed).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        unet.save_pretrained(tmp)
        if text_features is not None:
            save_text_features(tmp / TEXT_FEATURES_FILE, text_features, metadata)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        (tmp / "README.md").write_text(
            _README.format(
                name=out.name, meta=json.dumps(metadata, default=str), features=TEXT_FEATURES_FILE
            )
        )
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def unet_from_checkpoint(checkpoint: dict, use_ema: bool = True) -> torch.nn.Module:
    """Rebuild the domain model (``NullTextUNet``; SD3: ``NullTextSD3Transformer``) held by a
    NullTextFinetuneModule checkpoint (no SD needed)."""
    if "null_text_unet_config" not in checkpoint:
        raise KeyError(
            "checkpoint has no 'null_text_unet_config'; is it a checkpoint of the null-text "
            "fine-tuning stage (NullTextFinetuneModule)?"
        )
    config = dict(checkpoint["null_text_unet_config"])
    # the class the run trained (checkpoints written before SD3 name none: a NullTextUNet)
    model_class = DOMAIN_MODEL_CLASSES[config.pop("_class_name", NullTextUNet.__name__)]
    with torch.device("meta"):
        unet = model_class(**config)
    prefix = "domain_unet."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    if use_ema and checkpoint.get("ema") is not None:
        state.update(checkpoint["ema"]["shadow"])
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def export_from_checkpoint(
    ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool = True
) -> Path:
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_path}' does not exist.")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    unet = unet_from_checkpoint(checkpoint, use_ema=use_ema)
    meta = dict(checkpoint.get("idgen_metadata", {}))
    meta.update(
        checkpoint=str(ckpt_path.name),
        global_step=checkpoint.get("global_step"),
        weights="ema" if use_ema and checkpoint.get("ema") is not None else "raw",
    )
    return export_domain_model(unet, out_dir, checkpoint.get("text_features"), meta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt written by the null-text fine-tuning stage")
    parser.add_argument("out_dir", help="folder to write the domain model to")
    parser.add_argument("--no-ema", action="store_true", help="export raw (non-EMA) weights")
    args = parser.parse_args(argv)
    out = export_from_checkpoint(args.checkpoint, args.out_dir, use_ema=not args.no_ema)
    print(f"domain model written to {out}")


if __name__ == "__main__":
    main()
