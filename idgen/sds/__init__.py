"""Score distillation sampling (SDS) with the guidance-decoupled noise prediction (paper §4.3)."""

from idgen.sds.loss import MultiGuidanceSDS, SDSOutput, sds_loss, sds_terms, to_epsilon
from idgen.sds.schedule import TimestepSchedule, sds_weight

__all__ = [
    "MultiGuidanceSDS",
    "SDSOutput",
    "TimestepSchedule",
    "sds_loss",
    "sds_terms",
    "sds_weight",
    "to_epsilon",
]
