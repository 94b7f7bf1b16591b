"""Table 1 baselines: method objects, export/load in plain diffusers, sampling, #param counts."""

from idgen.baselines.export import export_baseline, load_baseline_pipeline, read_metadata
from idgen.baselines.methods import (
    METHODS,
    OFT,
    BaselineMethod,
    CustomDiffusion,
    FullFinetune,
    LoRA,
    TextualInversion,
)

__all__ = [
    "METHODS",
    "OFT",
    "BaselineMethod",
    "CustomDiffusion",
    "FullFinetune",
    "LoRA",
    "TextualInversion",
    "export_baseline",
    "load_baseline_pipeline",
    "read_metadata",
]
