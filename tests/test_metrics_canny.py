"""Canny discrepancy on synthetic shapes with known answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from idgen.metrics import canny_discrepancy, canny_edges


def _filled_square(size=64, x0=16, side=24, value=255) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[x0 : x0 + side, x0 : x0 + side] = value
    return img


def _outline(size=64, x0=16, side=24) -> np.ndarray:
    """A 1-pixel square outline: exactly 4 * (side - 1) white pixels."""
    img = np.zeros((size, size), np.uint8)
    cv2.rectangle(img, (x0, x0), (x0 + side - 1, x0 + side - 1), 255, thickness=1)
    return img


def test_outline_has_known_pixel_count():
    assert int((_outline() > 0).sum()) == 4 * (24 - 1)


def test_blank_sample_misses_every_condition_edge():
    # no edges in a flat sample: every condition edge pixel disagrees, nothing else does
    blank = np.full((64, 64, 3), 40, np.uint8)
    assert canny_discrepancy(blank, _outline()) == pytest.approx(4 * 23 / 64**2)


def test_sample_whose_edges_are_the_condition_scores_zero():
    sample = _filled_square()
    condition = cv2.Canny(cv2.cvtColor(sample, cv2.COLOR_RGB2GRAY), 100, 200)
    assert condition.any()
    assert canny_discrepancy(sample, condition) == 0.0
    # the condition given as a natural image (edges extracted from it) gives the same answer
    assert canny_discrepancy(sample, sample, condition_is_edges=False) == 0.0


def test_discrepancy_is_xor_fraction_and_grows_with_misalignment():
    condition = cv2.Canny(cv2.cvtColor(_filled_square(), cv2.COLOR_RGB2GRAY), 100, 200)
    scores = []
    for shift in (0, 2, 6):
        sample = _filled_square(x0=16 + shift)
        expected = np.mean(canny_edges(sample) != (condition > 127))
        got = canny_discrepancy(sample, condition)
        assert got == pytest.approx(expected)
        scores.append(got)
    assert scores[0] < scores[1] <= scores[2]


def test_sample_resized_to_condition_size():
    sample = _filled_square(size=128, x0=32, side=48)  # same shape at twice the size
    condition = cv2.Canny(cv2.cvtColor(_filled_square(), cv2.COLOR_RGB2GRAY), 100, 200)
    assert canny_discrepancy(sample, condition) < 0.01
    with pytest.raises(TypeError, match="uint8"):
        canny_discrepancy(sample.astype(np.float32), condition)
