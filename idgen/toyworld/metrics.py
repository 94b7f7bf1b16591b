"""Pixel-statistics metrics of the toy world: colour, shape, no-object and dark background.

Per image: the background is the median of the border pixels; foreground pixels are those
far from it; the colour is the majority nearest reference colour over the foreground; the
shape comes from how much of its circumscribed disc the foreground fills (circle ~1,
square ~0.64, triangle ~0.41, whatever the rotation). An image with too little foreground
is "no object". Over a set: colour/shape accuracy (no-object counts as wrong), no-object
rate, and domain fidelity = the fraction of images whose background is dark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from idgen.toyworld.render import COLOURS, SHAPES

# A background is dark when its mean channel value is below mid-grey.
DARK_THRESHOLD = 128.0
# A pixel is foreground when this far (Euclidean, 0-255 RGB) from the background...
FOREGROUND_DISTANCE = 60.0
# ...and an object needs at least this fraction of the image (the smallest rendered
# triangle covers about 4%).
MIN_OBJECT_FRACTION = 0.01
# Fill of the circumscribed disc: circle 1, square 2/pi = 0.64, triangle 3*sqrt(3)/(4*pi) = 0.41.
_SHAPE_FILL = {"circle": 1.0, "square": 2 / math.pi, "triangle": 3 * math.sqrt(3) / (4 * math.pi)}

_REFERENCE = np.array(list(COLOURS.values()), dtype=np.float32)
_COLOUR_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Reading:
    """What the pixel statistics see in one image."""

    background: tuple[float, float, float]
    dark: bool
    foreground_fraction: float
    colour: str | None  # None: no object
    shape: str | None


def to_uint8_arrays(images) -> list[np.ndarray]:
    """PIL images, HxWx3 uint8 arrays, or a float tensor [B,3,H,W] in [0,1] -> HxWx3 uint8."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a [B,3,H,W] tensor in [0,1], got shape {tuple(images.shape)}"
            )
        array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return list(array.permute(0, 2, 3, 1).cpu().numpy())
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: expected HxWx3 RGB, got shape {image.shape}")
        out.append(image)
    return out


def border_median(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the one-pixel border."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border.astype(np.float32), axis=0)


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into ``COLOURS`` of the nearest reference colour of each ``[N,3]`` pixel."""
    d = ((pixels[:, None, :].astype(np.float32) - _REFERENCE[None]) ** 2).sum(-1)
    return d.argmin(1)


def disc_fill(mask: np.ndarray) -> float:
    """Foreground area over the area of the disc around its centroid that holds it all."""
    ys, xs = np.nonzero(mask)
    # Pixel centres understate the reach by about half a pixel.
    reach = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() + 0.5
    return float(len(xs) / (math.pi * reach**2))


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose disc fill is nearest (in log space) to the mask's."""
    fill = math.log(disc_fill(mask))
    return min(SHAPES, key=lambda s: abs(fill - math.log(_SHAPE_FILL[s])))


def read_image(image: np.ndarray) -> Reading:
    """Background, darkness, colour and shape of one HxWx3 uint8 image."""
    background = border_median(image)
    dark = bool(background.mean() < DARK_THRESHOLD)
    distance = np.linalg.norm(image.astype(np.float32) - background, axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    fraction = float(mask.mean())
    if fraction < MIN_OBJECT_FRACTION:
        return Reading(tuple(background.tolist()), dark, fraction, None, None)
    votes = np.bincount(nearest_colour(image[mask]), minlength=len(_COLOUR_NAMES))
    colour = _COLOUR_NAMES[int(votes.argmax())]
    return Reading(tuple(background.tolist()), dark, fraction, colour, classify_shape(mask))


def score(
    images,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Toy-world metrics of a set of images against the requested colours/shapes.

    Returns ``n``, ``dark_fraction`` (domain fidelity), ``no_object_rate`` and, when targets
    are given, ``colour_accuracy`` / ``shape_accuracy`` over all images (no object = wrong).
    """
    readings = [read_image(a) for a in to_uint8_arrays(images)]
    n = len(readings)
    if n == 0:
        raise ValueError("score() needs at least one image")
    result = {
        "n": float(n),
        "dark_fraction": sum(r.dark for r in readings) / n,
        "no_object_rate": sum(r.colour is None for r in readings) / n,
    }
    for key, targets, attr in (("colour", colours, "colour"), ("shape", shapes, "shape")):
        if targets is None:
            continue
        if len(targets) != n:
            raise ValueError(f"{key}s: got {len(targets)} targets for {n} images")
        hits = sum(getattr(r, attr) == t for r, t in zip(readings, targets, strict=True))
        result[f"{key}_accuracy"] = hits / n
    return result
