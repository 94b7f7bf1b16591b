"""Per-step guidance trace for dashboards: each term's prediction norm and weight at each step.

``TracedInDomainPipeline`` is ``InDomainPipeline`` recording ``|eps|`` (per sample, as the
automatic weights measure it) of every prediction it makes; ``GuidanceTrace`` turns a call's
records plus the weights it returned into per-step means over all images sampled.
A term outside its active interval has weight 0 at that step and no prediction.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from idgen.guidance.weights import per_sample_norm
from idgen.pipelines import InDomainPipeline

UNCOND = "uncond"  # the frozen SD's unconditional prediction eps_sd(z, "")


class TracedInDomainPipeline(InDomainPipeline):
    """``InDomainPipeline`` that records each prediction's per-sample norm, step by step."""

    _current: dict[str, torch.Tensor] | None = None
    steps: list[dict[str, Any]]

    def _sd_predictions(self, latent_in, t, chunks):
        eps = super()._sd_predictions(latent_in, t, chunks)
        self._record({c.name: e for c, e in zip(chunks, eps, strict=True)})
        return eps

    def _model_prediction(self, term, latent_in, t):
        eps = super()._model_prediction(term, latent_in, t)
        self._record({term.name: eps})
        return eps

    def _record(self, preds: dict[str, torch.Tensor]) -> None:
        if self._current is None:
            self._current = {}
        for name, eps in preds.items():
            self._current[name] = per_sample_norm(eps).cpu()

    def step_end(self, pipe, step: int, t, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: closes the step's record."""
        self.steps.append({"step": step, "t": int(t), "norms": self._current or {}})
        self._current = None
        return callback_kwargs

    def __call__(self, *args, **kwargs):
        self.steps = []
        self._current = None
        if kwargs.get("callback_on_step_end") is None:
            kwargs["callback_on_step_end"] = self.step_end
        return super().__call__(*args, **kwargs)


class GuidanceTrace:
    """Sums of per-step norms and weights over the images sampled so far (real rows only)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, str, str], float] = defaultdict(float)
        self.counts: dict[int, int] = defaultdict(int)
        self.timesteps: dict[int, int] = {}

    def add(self, steps: list[dict[str, Any]], weights: dict[str, torch.Tensor], rows: int) -> None:
        """One call: ``steps`` from the pipeline, ``weights`` its guidance_weights; first ``rows`` count."""
        for record in steps:
            i = record["step"]
            self.timesteps[i] = record["t"]
            self.counts[i] += rows
            for name, norm in record["norms"].items():
                self.sums[(i, name, "pred_norm")] += float(norm[:rows].sum())
            for name, w in weights.items():
                active = name in record["norms"]
                value = float(w[:rows].float().sum()) if active else 0.0
                self.sums[(i, name, "weight")] += value

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
