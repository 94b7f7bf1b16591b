"""The LightningModule that carries an exported domain model into ``Trainer.predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from idgen.models.domain_models import load_domain_model
from idgen.sampling.components import existing


class DomainModel(L.LightningModule):
    """An exported ``domain_model/`` folder (``NullTextUNet``; ``NullTextSD3Transformer`` for an
    SD3 base) as ``domain_unet``, or no domain
    model (``path=None``: e.g. plain CFG). Loaded in ``setup``; Lightning moves it to the device.

    ``predict_step`` passes the plan items through: :class:`DecoupledGuidanceSampling` samples.
    """

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = path
        self.domain_unet: Any = None

    def setup(self, stage: str) -> None:
        if self.domain_unet is None and self.path:
            unet = load_domain_model(existing(self.path, "domain_model"))
            self.domain_unet = unet.requires_grad_(False).eval()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return batch
