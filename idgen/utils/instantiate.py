"""Instantiate dict-shaped config groups (callbacks, loggers) as lists."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def instantiate_dict_group(group: DictConfig | None, what: str) -> list:
    """Each entry with a ``_target_`` in a ``{name: {...}}`` group, instantiated, in order."""
    objects: list = []
    if not group:
        return objects
    if not isinstance(group, DictConfig):
        raise TypeError(f"The {what} config must be a mapping of name -> object config")
    for name, conf in group.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("Instantiating %s <%s>", what, conf._target_)
            objects.append(instantiate(conf))
        elif conf is not None:
            raise ValueError(f"{what}.{name} has no _target_; remove it or give one")
    return objects
