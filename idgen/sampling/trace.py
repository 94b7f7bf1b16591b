"""Per-step guidance trace for dashboards: each term's prediction norm and weight at each step.

``GuidanceTrace`` is a diffusers ``PipelineCallback``: pass it as ``callback_on_step_end`` and
``InDomainPipeline`` hands it the step's predictions and weights. It keeps them on the device
during the call and moves them to the host once, in :meth:`GuidanceTrace.end_call`; without it
the pipeline builds nothing (no host sync). A term outside its active interval has weight 0 at
that step; a term reusing an earlier prediction (``reuse_every``) has no prediction norm.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from idgen.guidance import per_sample_norm
from idgen.pipelines.in_domain import UNCOND


class GuidanceTrace(PipelineCallback):
    """Sums of per-step norms and weights over the images sampled so far (real rows only)."""

    tensor_inputs = ["eps_uncond", "guidance_preds", "guidance_weights"]

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[tuple[int, str, str], float] = defaultdict(float)
        self.counts: dict[int, int] = defaultdict(int)
        self.timesteps: dict[int, int] = {}
        self._steps: list[tuple[int, Any, dict[str, torch.Tensor], dict[str, Any]]] = []

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """Record this step's norms (on the device) and the active terms' weights."""
        preds = {UNCOND: callback_kwargs["eps_uncond"], **callback_kwargs["guidance_preds"]}
        norms = {name: per_sample_norm(eps) for name, eps in preds.items()}
        self._steps.append((step_index, timestep, norms, dict(callback_kwargs["guidance_weights"])))
        return {}

    def end_call(self, rows: int, names: Iterable[str]) -> None:
        """Add the finished call's steps: the first ``rows`` images count, ``names`` are its terms."""
        names = list(names)
        for i, t, norms, weights in self._steps:
            self.timesteps[i] = int(t)
            self.counts[i] += rows
            for name, norm in norms.items():
                self.sums[(i, name, "pred_norm")] += float(norm[:rows].sum())
            for name in names:
                w = weights.get(name, 0.0)
                value = float(w[:rows].float().sum()) if isinstance(w, torch.Tensor) else w * rows
                self.sums[(i, name, "weight")] += float(value)
        self._steps = []

    def series(self) -> list[dict[str, float]]:
        """One row per step: ``guidance/<term>/{pred_norm,weight}`` means and the timestep."""
        rows = []
        for i in sorted(self.counts):
            row = {"guidance/timestep": float(self.timesteps[i])}
            for (step, name, what), total in sorted(self.sums.items()):
                if step == i:
                    row[f"guidance/{name}/{what}"] = total / self.counts[i]
            rows.append(row)
        return rows

    def table(self) -> tuple[list[str], list[list]]:
        """(columns, rows) in long form: step, timestep, term, weight, prediction norm."""
        columns = ["step", "timestep", "term", "weight", "pred_norm"]
        rows = []
        for i, row in enumerate(self.series()):
            names = sorted({k.split("/")[1] for k in row if k.count("/") == 2})
            for name in names:
                rows.append(
                    [
                        i,
                        int(row["guidance/timestep"]),
                        name,
                        row.get(f"guidance/{name}/weight", float("nan")),
                        row.get(f"guidance/{name}/pred_norm", float("nan")),
                    ]
                )
        return columns, rows
