"""Pure tensor functions that mix noise predictions, automatic weights and guidance terms."""

from idgen.guidance.combine import cfg, decoupled_guidance, multi_guidance
from idgen.guidance.terms import GuidanceTerm
from idgen.guidance.weights import auto_weight, is_active, per_sample_norm

__all__ = [
    "GuidanceTerm",
    "auto_weight",
    "cfg",
    "decoupled_guidance",
    "is_active",
    "multi_guidance",
    "per_sample_norm",
]
