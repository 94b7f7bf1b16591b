"""Wall time per named stage of a long job (reported in its results, with the load average)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StageTimer:
    """``timer.run(stage, fn, *args)`` calls ``fn(*args)`` and adds its wall time to
    ``timer.seconds[stage]`` (rounded to 0.1 s; a stage run several times adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            elapsed = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.seconds[stage] = round(elapsed, 1)
