"""The guidance-decoupled multi-guidance samplers (diffusers pipelines), one per model family."""

from typing import Any

from idgen.guidance import GuidanceTerm
from idgen.pipelines.in_domain import (
    InDomainPipeline,
    InDomainPipelineOutput,
    fix_scheduler_config,
    make_scheduler,
)
from idgen.pipelines.in_domain_sd3 import InDomainSD3Pipeline
from idgen.pipelines.in_domain_xl import InDomainXLPipeline

#: the decoupled sampler of each model family (``idgen.models.FAMILIES``' names)
DECOUPLED_PIPELINES: dict[str, type] = {
    "sd15": InDomainPipeline,
    "sdxl": InDomainXLPipeline,
    "sd3": InDomainSD3Pipeline,
}


def decoupled_pipeline_class(family: Any) -> type:
    """The decoupled pipeline class of a model family (a ``ModelFamily`` or its name)."""
    name = getattr(family, "name", family)
    if name not in DECOUPLED_PIPELINES:
        raise ValueError(
            f"no decoupled sampler for model family {name!r}; known: {sorted(DECOUPLED_PIPELINES)}"
        )
    return DECOUPLED_PIPELINES[name]


__all__ = [
    "DECOUPLED_PIPELINES",
    "GuidanceTerm",
    "InDomainPipeline",
    "InDomainPipelineOutput",
    "InDomainSD3Pipeline",
    "InDomainXLPipeline",
    "decoupled_pipeline_class",
    "fix_scheduler_config",
    "make_scheduler",
]
