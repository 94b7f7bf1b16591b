"""metrics.json: one atomic JSON file per evaluation run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from idgen.utils.io import atomic_write_text

METRICS_FILE = "metrics.json"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable instead of failing
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_metrics(run_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write ``metrics`` to ``run_dir/metrics.json`` atomically and return the path."""
    text = json.dumps(_jsonable(metrics), indent=2, sort_keys=True)
    return atomic_write_text(Path(run_dir) / METRICS_FILE, text + "\n")


def read_metrics(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())
