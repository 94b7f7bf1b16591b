"""Exported domain models: the classes idgen writes (one per family's denoiser) and loading a
folder as the class its ``config.json`` names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from idgen.models.null_text_transformer import NullTextSD3Transformer
from idgen.models.null_text_unet import NullTextUNet

#: ``config.json`` ``_class_name`` -> class of every text-free domain model idgen exports
DOMAIN_MODEL_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (NullTextUNet, NullTextSD3Transformer)
}


def load_domain_model(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """The domain model in ``folder`` (an idgen export) as its own class; ``kwargs`` go to its
    ``from_pretrained``. A folder of any other model raises ``ValueError`` naming its class."""
    config = Path(folder) / "config.json"
    name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if name not in DOMAIN_MODEL_CLASSES:
        raise ValueError(
            f"'{folder}' holds a {name or 'non-idgen'} model, not an idgen domain model "
            f"({', '.join(DOMAIN_MODEL_CLASSES)})."
        )
    return DOMAIN_MODEL_CLASSES[name].from_pretrained(folder, **kwargs)
