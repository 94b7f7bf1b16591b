"""make_grid: every image pasted intact, a title above and a label under each image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idgen.utils.images import make_grid

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def _tiles(size: int = 24) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), c) for c in COLOURS]


def _pixels_of(grid: np.ndarray, colour) -> np.ndarray:
    return np.argwhere((grid == np.array(colour)).all(axis=-1))


@pytest.mark.parametrize("captioned", [False, True])
def test_every_image_is_pasted_whole_and_in_row_major_order(captioned):
    kw = {"title": "a title", "labels": [f"seed {i}" for i in range(5)]} if captioned else {}
    grid = np.asarray(make_grid(_tiles(), ncols=3, **kw))
    corners = []
    for colour in COLOURS:
        where = _pixels_of(grid, colour)
        assert len(where) == 24 * 24  # the whole tile, nothing else of its colour
        (top, left), (bottom, right) = where.min(axis=0), where.max(axis=0)
        assert (bottom - top, right - left) == (23, 23)  # one solid square
        corners.append((top, left))
    rows = sorted({t for t, _ in corners})
    assert len(rows) == 2  # 5 tiles in rows of 3
    assert corners == sorted(corners, key=lambda tl: (tl[0], tl[1]))  # row-major
    assert grid.shape[1] == 3 * 24 + 4 * 2  # the width is the tiles and gaps only


def test_title_above_and_labels_under_the_images():
    plain = np.asarray(make_grid(_tiles(), ncols=3))
    grid = np.asarray(
        make_grid(_tiles(), ncols=3, title="prompt | seeds 0..4", labels=list("abcde"))
    )
    assert grid.shape[1] == plain.shape[1] and grid.shape[0] > plain.shape[0]
    first_tile_top = _pixels_of(grid, COLOURS[0])[:, 0].min()
    dark = (grid < 100).all(axis=-1)  # black text on white
    assert dark[:first_tile_top].any()  # the title
    tile_bottom = _pixels_of(grid, COLOURS[0])[:, 0].max()
    second_row_top = _pixels_of(grid, COLOURS[3])[:, 0].min()
    assert dark[tile_bottom + 1 : second_row_top].any()  # the first row's labels
    assert not (plain < 100).all(axis=-1).any()  # no text without captions


def test_long_titles_wrap_and_labels_must_match_the_images():
    short = make_grid(_tiles(), ncols=3, title="x")
    long = make_grid(_tiles(), ncols=3, title=" ".join(["word"] * 60))
    assert long.size[0] == short.size[0] and long.size[1] > short.size[1]  # more lines, same width
    with pytest.raises(ValueError, match="2 labels for 5 images"):
        make_grid(_tiles(), labels=["a", "b"])
