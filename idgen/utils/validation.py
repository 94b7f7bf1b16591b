"""Config field checks and user errors: one clear message naming the field, the value and what to
do, raised before any model is loaded or data scanned.

:class:`ConfigError` (a :class:`UserInputError`) is what the task wrapper turns into one
``error: ...`` line and exit code 2; ``check_int``, ``check_dir``... are the field checks each
CLI's preflight (``idgen.preflight``) is built from. The same module holds the guards against
silently wrong results: :func:`assert_finite` for images/latents before they are written, and
:class:`NonFiniteLossError` for training.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

log = logging.getLogger(__name__)

_MISSING = object()


class UserInputError(ValueError):
    """A mistake in what the user gave (config value, file, folder); shown without a traceback."""


class ConfigError(UserInputError):
    """``field=value`` is not usable: ``problem``; ``fix`` says what to do."""

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        shown = "<unset>" if value is _MISSING else repr(value)
        super().__init__(f"{field}={shown}: {problem}. {fix}")


class PathError(ConfigError, FileNotFoundError):
    """A configured file or folder is missing, of the wrong kind, or empty."""


class NonFiniteError(UserInputError, FloatingPointError):
    """A NaN/inf value where a result was about to be written or used (also a
    ``FloatingPointError``, what numeric code catches)."""


class NonFiniteLossError(NonFiniteError):
    """The training loss (or gradient) became NaN/inf; training stopped before the update."""


# --------------------------------------------------------------------------- reading the config


def get(cfg: DictConfig, key: str, default: Any = _MISSING) -> Any:
    """``cfg``'s value at dotted ``key``, resolved; a ``???`` or unresolvable value is an error."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(
            key, _MISSING, "is required and not set", f"Pass {key}=<value> on the command line."
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(
            key, "<interpolation>", f"cannot be resolved ({err})", "Fix the interpolation."
        ) from None
    if value is _MISSING:
        return None if default is _MISSING else default
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_int(
    cfg: DictConfig,
    key: str,
    minimum: int | None = 1,
    optional: bool = False,
    multiple_of: int | None = None,
    extra: tuple[int, ...] = (),
    why: str = "",
) -> int | None:
    """An integer ``>= minimum`` (``None`` allowed when ``optional``; values in ``extra`` pass)."""
    value = get(cfg, key)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, "must be an integer", f"Pass {key}=<integer>.")
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(
                key, value, "must be an integer", f"Pass a whole number, e.g. {key}=64."
            )
    if value in extra:
        return value
    if minimum is not None and value < minimum:
        allowed = f" (or {', '.join(map(str, extra))})" if extra else ""
        raise ConfigError(
            key,
            value,
            f"must be >= {minimum}{allowed}{why}",
            f"Pass {key}=<integer >= {minimum}>.",
        )
    if multiple_of and value % multiple_of:
        lower = max(multiple_of, value - value % multiple_of)
        raise ConfigError(
            key,
            value,
            f"must be a multiple of {multiple_of}{why}",
            f"Use {key}={lower} or {key}={lower + multiple_of}.",
        )
    return value


def check_float(
    cfg: DictConfig,
    key: str,
    optional: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
    open_max: bool = False,
    positive: bool = False,
) -> float | None:
    """A finite number (``None`` allowed when ``optional``) within the given bounds."""
    value = get(cfg, key)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, "must be a number", f"Pass {key}=<number>.")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, value, "must be a number", f"Pass e.g. {key}=1.0.")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(
            key, value, "must be finite (NaN/inf make every result NaN)", f"Pass a finite {key}."
        )
    if positive and value <= 0:
        raise ConfigError(key, value, "must be > 0", f"Pass {key}=<positive number>.")
    if minimum is not None and value < minimum:
        raise ConfigError(key, value, f"must be >= {minimum}", f"Pass {key} >= {minimum}.")
    if maximum is not None and (value >= maximum if open_max else value > maximum):
        bound = f"< {maximum}" if open_max else f"<= {maximum}"
        raise ConfigError(key, value, f"must be {bound}", f"Pass {key} {bound}.")
    return value


def check_choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> Any:
    value = get(cfg, key)
    if value not in choices:
        raise ConfigError(
            key,
            value,
            f"is not one of {', '.join(map(str, choices))}",
            f"Pass {key}=<one of those>.",
        )
    return value


def _has_file(root: Path, extensions: Iterable[str] | None) -> bool:
    """Whether ``root`` holds (recursively) one file with one of ``extensions``; stops at the first."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    for _dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if name.startswith("."):
                continue
            if exts is None or name.lower().endswith(exts):
                return True
    return False


def check_dir(
    key: str,
    value: Any,
    what: str,
    extensions: Iterable[str] | None = None,
    nonempty: bool = True,
    noun: str = "folder",
) -> Path:
    """``value`` is an existing folder (holding a file with one of ``extensions`` when asked)."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(key, value, f"must be the path of {what}", f"Pass {key}=<folder>.")
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise PathError(
            key, str(value), f"{noun} '{path}' does not exist", f"Pass {key}=<folder of {what}>."
        )
    if not path.is_dir():
        raise PathError(
            key, str(value), "is a file, not a folder", f"Pass the folder that holds {what}."
        )
    if nonempty and not _has_file(path, extensions):
        kinds = f" with extensions {', '.join(extensions)}" if extensions else ""
        raise PathError(
            key, str(value), f"holds no files{kinds}", f"Put {what} there or pass another folder."
        )
    return path


def check_file(key: str, value: Any, what: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(key, value, f"must be the path of {what}", f"Pass {key}=<file>.")
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise PathError(key, str(value), f"file '{path}' does not exist", f"Pass {key}=<{what}>.")
    if not path.is_file():
        raise PathError(key, str(value), "is a folder, not a file", f"Pass the {what} itself.")
    return path


# ---------------------------------------------------------------------------- results: finite


def is_finite(value: Any) -> bool:
    """Whether a tensor / array / number / nested dict or list of them holds no NaN or inf.

    PIL images are 8-bit (always finite): check the float image before it is converted.
    """
    import numpy as np
    import torch

    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, np.ndarray):
        return bool(np.isfinite(value).all()) if np.issubdtype(value.dtype, np.inexact) else True
    if isinstance(value, int | float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(is_finite(v) for v in value)
    return True


def assert_finite(value: Any, what: str, fix: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``what`` when ``value`` holds NaN/inf (nothing written)."""
    if not is_finite(value):
        raise NonFiniteError(
            f"{what} holds NaN or inf values; nothing was written for it. "
            + (fix or "Check the guidance weights (sampler.w_d, sampler.w_c) and the model files.")
        )


def assert_finite_images(items: Iterable[dict[str, Any]], keys: Sequence[str] = ()) -> None:
    """Check a batch of sample records (``{"index", "image", "guidance_weights", ...}``).

    Float tensors/arrays under any key and every guidance weight must be finite; ``keys`` limits
    the check to those keys. ``DecoupledGuidanceSampling`` calls it on the float pixels
    (``pixels``) and weights of every sampled batch, before any PNG is written or marked done.
    """
    for item in items:
        values = {k: item.get(k) for k in keys} if keys else item
        if not is_finite(values):
            bad = sorted(k for k, v in values.items() if not is_finite(v))
            raise NonFiniteError(
                f"sample {item.get('index')} (prompt {item.get('prompt')!r}) has non-finite "
                f"{', '.join(bad)}; it was not written and will be redone on the next run. "
                "Check sampler.w_d / sampler.w_c and the domain model's weights."
            )


# ------------------------------------------------------------------------------- run folders


def remove_stale_temp_files(root: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete what interrupted atomic writes leave under ``root`` and return it.

    ``idgen.utils.io`` writes ``.<name>.<host>-<pid>-<random>.tmp`` files and
    ``.<name>.<random>`` folders (exports) next to their target and renames them when complete;
    ``replace_dir`` leaves
    ``.<name>.old-<pid>`` when killed between its two renames. A kill leaves them behind. Only
    entries older than ``min_age_s`` go (for folders other jobs may be writing into, e.g. caches).
    """
    import shutil
    import time

    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                path = here / name
                try:
                    if now - path.stat().st_mtime >= min_age_s:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    pass
        for name in list(dirs):
            # export_domain_model's mkdtemp(prefix=".<name>.") folders and replace_dir leftovers
            if name.startswith(".") and (".old-" in name or name.count(".") >= 2):
                path = here / name
                if name in (".cache", ".git", ".hydra") or name.startswith((".cache", ".git")):
                    continue
                try:
                    if now - path.stat().st_mtime >= min_age_s:
                        shutil.rmtree(path, ignore_errors=True)
                        removed.append(path)
                        dirs.remove(name)
                except FileNotFoundError:
                    pass
    for path in removed:
        log.info("removed the leftover of an interrupted write: %s", path)
    return removed
