"""Logger factories with sensible offline behaviour."""

from __future__ import annotations

import logging
import os

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_has_key() -> bool:
    """Whether wandb can authenticate (env var or a stored `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.setup().settings.api_key)
    except Exception:
        return False


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline (and says so once) when no API key is configured."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun", "disabled") or not wandb_has_key()
        if offline and mode not in ("offline", "dryrun", "disabled"):
            log.warning(
                "wandb: no API key configured, logging offline to %s (sync later with `wandb sync`).",
                kwargs.get("save_dir", "."),
            )
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return WandbLogger(offline=offline, **kwargs)
