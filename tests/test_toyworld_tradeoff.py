"""experiments/toyworld/tradeoff.py: Pareto fronts, the best in-domain point and the plot."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "toyworld"))

from tradeoff import best_in_domain, draw, pareto_front  # noqa: E402


def _p(colour, dark, w_d=0.0, w_c=2.5, **extra):
    return {"w_d": w_d, "w_c": w_c, "colour": colour, "dark": dark, "fid": None, "n": 48, **extra}


def test_pareto_front_and_best_in_domain():
    a, b, c, d = _p(1.0, 0.0), _p(0.8, 0.95, 2), _p(0.7, 0.9, 1), _p(0.5, 1.0, 3)
    # c is beaten by b on both axes; the others trade one axis for the other.
    assert pareto_front([a, b, c, d]) == [a, b, d]
    assert best_in_domain([a, b, c, d]) == b
    assert best_in_domain([a]) is None


def test_plot_is_a_real_figure_with_every_series(tmp_path):
    series = {
        "ours": [_p(0.9, 0.2, 1), _p(0.8, 0.95, 2)],
        "fine-tuned": [_p(0.3, 1.0, 0, 1.5), _p(0.4, 0.97, 0, 2.5)],
        "fine-tuned (steps)": [_p(0.6, 0.5, steps=50), _p(0.3, 1.0, steps=400)],
        "base": [_p(0.97, 0.15)],
    }
    out = draw(series, tmp_path / "tradeoff.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] >= 600 and image.shape[1] >= 800  # matplotlib at 150 dpi, not a sketch
    # each series' marker colour (matplotlib's tab: palette) appears in the plot
    for rgb in ((31, 119, 180), (214, 39, 40), (255, 127, 14), (127, 127, 127)):
        assert (np.abs(image.astype(int) - rgb).sum(-1) < 30).any(), rgb
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
