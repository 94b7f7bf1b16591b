"""InDomainPipeline: the guidance-decoupled multi-guidance sampler (a diffusers pipeline)."""

from idgen.guidance import GuidanceTerm
from idgen.pipelines.in_domain import (
    InDomainPipeline,
    InDomainPipelineOutput,
    fix_scheduler_config,
    make_scheduler,
)

__all__ = [
    "GuidanceTerm",
    "InDomainPipeline",
    "InDomainPipelineOutput",
    "fix_scheduler_config",
    "make_scheduler",
]
