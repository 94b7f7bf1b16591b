"""The console scripts ``idgen-train``, ``idgen-sample``, ``idgen-eval`` and ``idgen-3d``.

Each is ``@hydra.main`` + :func:`~idgen.utils.task.task_wrapper` around its task
(``idgen.train:train``, ...), with nothing heavy imported before the task runs: ``--help``,
``--cfg job`` and Hydra's override errors need only Hydra and the config, and the config's
preflight (``idgen.preflight``, no torch) runs before torch, Lightning and diffusers load, so a
user mistake is one line in about a second instead of after ten seconds of imports. The task
modules are named as strings and imported on first call (``python -m idgen.train`` works too:
its ``main`` is this module's ``train``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from idgen import CONFIG_DIR
from idgen.utils.task import console_main, task_wrapper


def _entry(config_name: str, task: str, preflight: str, doc: str) -> Callable[[], None]:
    """The console script for ``task`` (``"module:function"``), composing ``config_name``;
    ``preflight`` names the ``idgen.preflight`` check the task itself starts with."""
    module_name, function = task.split(":")

    def hydra_main(cfg: DictConfig) -> Any:
        # The same check the task starts with (milliseconds), run here before the task's
        # module (and with it torch, Lightning, diffusers) is imported.
        getattr(importlib.import_module("idgen.preflight"), preflight)(cfg)
        return getattr(importlib.import_module(module_name), function)(cfg)

    hydra_main.__doc__ = doc
    hydra_main.__module__ = module_name  # Hydra names the job after it (hydra.job.name)
    decorated = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    return console_main(decorated(task_wrapper(hydra_main)), CONFIG_DIR)


train = _entry(
    "train.yaml",
    "idgen.train:train",
    "validate_train",
    '``idgen-train``: ``logger=null`` (any ``group=null``) is accepted as "no group".',
)
sample = _entry(
    "sample.yaml",
    "idgen.sample:sample",
    "validate_sample",
    '``idgen-sample``: ``logger=null`` (any ``group=null``) is accepted as "no group".',
)
evaluate = _entry(
    "eval.yaml",
    "idgen.evaluate:evaluate",
    "validate_eval",
    '``idgen-eval``: metrics of a samples folder; ``group=null`` is accepted as "no group".',
)
text_to_3d = _entry(
    "3d.yaml",
    "idgen.text_to_3d:text_to_3d",
    "validate_3d",
    '``idgen-3d``: text-to-3D by SDS; ``group=null`` is accepted as "no group".',
)
