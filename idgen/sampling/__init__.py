"""Guidance-decoupled sampling: settings, the plan, the predict-time callback, writer and trace.

settings.py     SamplerSettings (idgen/conf/sampler/*.yaml) -> InDomainPipeline arguments
plan.py         index -> prompt, seed, file name; PromptsDataModule (prompts x seeds)
callback.py     DecoupledGuidanceSampling: samples predict batches / validation grids
domain_model.py DomainModel: an exported domain_model/ as a LightningModule
components.py   what the settings' paths open to (ControlNets, images, extra models)
writer.py       PNGs with parameters, samples.jsonl, grids; resume
trace.py        per-step weights and prediction norms (a diffusers PipelineCallback)
"""

from idgen.sampling.callback import DecoupledGuidanceSampling
from idgen.sampling.domain_model import DomainModel
from idgen.sampling.plan import (
    PromptGrid,
    PromptsDataModule,
    SamplingPlan,
    collate,
    image_seed,
    params_hash,
)
from idgen.sampling.settings import SamplerSettings, read_prompts
from idgen.sampling.trace import GuidanceTrace
from idgen.sampling.writer import HASH_KEY, PARAMS_KEY, SampleWriter

__all__ = [
    "HASH_KEY",
    "PARAMS_KEY",
    "DecoupledGuidanceSampling",
    "DomainModel",
    "GuidanceTrace",
    "PromptGrid",
    "PromptsDataModule",
    "SampleWriter",
    "SamplerSettings",
    "SamplingPlan",
    "collate",
    "image_seed",
    "params_hash",
    "read_prompts",
]
