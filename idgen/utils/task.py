"""The one shape of idgen's entry points (lightning-hydra-template's ``task_wrapper``).

Each CLI is ``task(cfg) -> dict of metrics`` under ``@hydra.main`` and :func:`task_wrapper`
(built in ``idgen.cli``, which imports the task's module only when it runs), and ``main()``
(the console script, :func:`console_main`) accepts ``group=null`` before Hydra parses the
command line and closes Hydra's log handlers at the end.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from idgen.utils.threads import ThreadPlan, apply_threads, plan_threads
from idgen.utils.validation import ConfigError, UserInputError, check_int

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(task: F) -> F:
    """Decorate a Hydra task: a :class:`UserInputError` (a missing model folder is one too) becomes
    one ``error: ...`` line on stderr and exit code 2; programming errors keep their traceback."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            # SystemExit is not an Exception: Hydra lets it through without printing a traceback.
            raise SystemExit(2) from None

    return wrapped  # type: ignore[return-value]


def accept_null_groups(argv: Sequence[str], config_dir: str | os.PathLike) -> list[str]:
    """``group=null`` on the command line means "no group" (Hydra's own spelling is ``~group``).

    Hydra refuses ``logger=null`` with a traceback ("Config group override must be a string or
    a list"); every other value may be null, so users type it. Only names of config groups (the
    folders of ``config_dir``) are rewritten.
    """
    out = list(argv[:1])
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and value in ("null", "None", "none") and (Path(config_dir) / key).is_dir():
            if value == "none" and (Path(config_dir) / key / "none.yaml").is_file():
                out.append(arg)  # a real config called none.yaml (e.g. callbacks=none)
                continue
            out.append(f"~{key}")
        else:
            out.append(arg)
    return out


def close_loggers() -> None:
    """Finish a wandb run left open (a failed task's), so the next job of a sweep gets its own."""
    if "wandb" not in sys.modules:  # never imported: nothing to close (and no import cost)
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


def optimized_metric(cfg: DictConfig, metrics: Mapping[str, Any]) -> float | None:
    """``metrics[cfg.optimized_metric]`` for sweepers; None when ``optimized_metric`` is unset.

    A name the run did not compute is an error (a sweeper would otherwise optimise ``None``).
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            "optimized_metric",
            name,
            f"is not among the metrics this run computed ({', '.join(sorted(metrics))})",
            "Pick one of them, or set optimized_metric=null.",
        )
    return float(metrics[name])


def configure_threads(cfg: DictConfig) -> ThreadPlan:
    """Choose and set the run's torch threads and DataLoader workers (``idgen.utils.threads``).

    ``threads`` (top level) and ``data.num_workers`` override the computed values; a null
    ``data.num_workers`` is replaced by the chosen count in ``cfg`` (so config.yaml records it).
    """
    threads = check_int(cfg, "threads", optional=True) if "threads" in cfg else None
    data = cfg.get("data")
    has_workers = isinstance(data, DictConfig) and "num_workers" in data
    workers = check_int(cfg, "data.num_workers", minimum=0, optional=True) if has_workers else None
    trainer = cfg.get("trainer")
    processes = 1  # DDP on CPU: that many processes share the CPUs
    if isinstance(trainer, DictConfig) and trainer.get("accelerator") == "cpu":
        devices = trainer.get("devices")
        processes = devices if isinstance(devices, int) and devices > 1 else 1
    plan = plan_threads(threads=threads, workers=workers, processes=processes)
    apply_threads(plan)
    if has_workers and workers is None:
        data.num_workers = plan.workers
    return plan


def close_log_handlers() -> None:
    """Flush, close and remove the root handlers Hydra's ``job_logging`` installed (console and
    file; ``logging.config`` names them, handlers of others such as pytest's have no name).

    Without it a handler outlives its stream: whatever logs after the run (an ``atexit`` hook,
    a caller that closed the stream it gave as stdout) prints "--- Logging error --- ... I/O
    operation on closed file".
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name()]:
        handler.flush()
        handler.close()
        root.removeHandler(handler)


def task_wrapper(task: Callable[[DictConfig], Mapping[str, Any]]) -> Callable[..., float | None]:
    """Run ``task(cfg)``; whatever happens, close the loggers and log the run dir.

    User mistakes become one ``error: ...`` line and exit code 2 (:func:`cli_errors`); the
    return value is :func:`optimized_metric` of the task's metrics.
    """

    @functools.wraps(task)
    @cli_errors
    def run(cfg: DictConfig) -> float | None:
        log.info(configure_threads(cfg).describe())
        try:
            metrics = task(cfg)
        finally:
            close_loggers()
            output_dir = cfg.get("paths", {}).get("output_dir")
            if output_dir:
                log.info("run dir: %s", output_dir)
        return optimized_metric(cfg, metrics or {})

    return run


def console_main(hydra_main: Callable[[], Any], config_dir: str) -> Callable[[], None]:
    """The console script around ``hydra_main``: ``group=null`` is accepted as "no group".

    ``main.__wrapped__`` is the wrapped task itself (sweepers and tests call it with a cfg).
    """

    def main() -> None:
        sys.argv = accept_null_groups(sys.argv, config_dir)
        try:
            hydra_main()
        finally:
            close_log_handlers()

    main.__wrapped__ = hydra_main.__wrapped__  # type: ignore[attr-defined]
    main.__doc__ = hydra_main.__doc__
    return main
