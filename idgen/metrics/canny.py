"""Canny discrepancy between generated samples and their ControlNet canny conditions.

Definition (Table 1, spatial-guided "Align.", lower is better). For a sample S and its
condition C (the edge map given to a canny ControlNet):

1. E_C = C converted to grayscale and binarised at > 127 (ControlNet canny conditions are
   white edges on black). With ``condition_is_edges=False``, C is a natural image instead
   and E_C = Canny(gray(C), low, high).
2. S is converted to grayscale (ITU-R 601 luma, OpenCV), resized to C's size with area
   interpolation if sizes differ, and E_S = cv2.Canny(gray(S), low, high) with L1 gradient
   (OpenCV's default; ControlNet's canny annotator uses low=100, high=200).
3. d(S, C) = mean over pixels of [E_S != E_C], the fraction of pixels whose edge/non-edge
   label disagrees, in [0, 1].

The reported score is the mean of d over all (sample, condition) pairs.
"""

from __future__ import annotations

import cv2
import numpy as np


def to_gray(image: np.ndarray) -> np.ndarray:
    """HxW or HxWx3 RGB uint8 -> HxW uint8."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Boolean HxW canny edge map of a uint8 image."""
    return cv2.Canny(to_gray(image), low, high) > 0


def condition_edges(
    condition: np.ndarray, condition_is_edges: bool = True, low: int = 100, high: int = 200
) -> np.ndarray:
    return to_gray(condition) > 127 if condition_is_edges else canny_edges(condition, low, high)


def canny_discrepancy(
    sample: np.ndarray,
    condition: np.ndarray,
    low: int = 100,
    high: int = 200,
    condition_is_edges: bool = True,
) -> float:
    """Fraction of pixels where the sample's canny edges and the condition's edges disagree."""
    target = condition_edges(condition, condition_is_edges, low, high)
    gray = to_gray(sample)
    if gray.shape != target.shape:
        gray = cv2.resize(gray, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA)
    edges = cv2.Canny(gray, low, high) > 0
    return float(np.mean(edges != target))
