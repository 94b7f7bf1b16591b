"""Mixing noise predictions: guidance terms, the guider that mixes them, automatic weights."""

from idgen.guidance.combine import (
    CONTROL,
    DOMAIN,
    Guider,
    add_directions,
    cfg,
    decoupled_guidance,
    decoupled_terms,
    multi_guidance,
)
from idgen.guidance.terms import DOMAIN_UNET, GuidanceTerm
from idgen.guidance.weights import auto_weight, is_active, per_sample_norm

__all__ = [
    "CONTROL",
    "DOMAIN",
    "DOMAIN_UNET",
    "GuidanceTerm",
    "Guider",
    "add_directions",
    "auto_weight",
    "cfg",
    "decoupled_guidance",
    "decoupled_terms",
    "is_active",
    "multi_guidance",
    "per_sample_norm",
]
