"""LightningModules: text-feature inversion and null-text domain UNet fine-tuning."""

from idgen.modules.ema import EMA
from idgen.modules.export import export_domain_model, export_from_checkpoint
from idgen.modules.null_text_finetune import NullTextFinetuneModule
from idgen.modules.text_inversion import TextFeatureInversionModule

__all__ = [
    "EMA",
    "NullTextFinetuneModule",
    "TextFeatureInversionModule",
    "export_domain_model",
    "export_from_checkpoint",
]
