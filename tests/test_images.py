"""make_grid: every image pasted intact, a title above and a label under each image.

Cells smaller than 256 px are enlarged by an integer factor, nearest-neighbour (issue 23: 32-64
px grids were unreadable): the 24 px tiles below become 11 x 24 = 264 px squares.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idgen.utils.images import MIN_CELL, make_grid, upscale

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
CELL = 24 * 11  # the smallest multiple of the 24 px tiles that is >= 256 px


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
        assert len(where) == CELL * CELL  # the whole tile, enlarged, nothing else of its colour
        (top, left), (bottom, right) = where.min(axis=0), where.max(axis=0)
        assert (bottom - top, right - left) == (CELL - 1, CELL - 1)  # one solid square
        corners.append((top, left))
    rows = sorted({t for t, _ in corners})
    assert len(rows) == 2  # 5 tiles in rows of 3
    assert corners == sorted(corners, key=lambda tl: (tl[0], tl[1]))  # row-major
    assert grid.shape[1] == 3 * CELL + 4 * 2  # the width is the tiles and gaps only


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


def test_small_images_are_enlarged_pixel_for_pixel():
    """A 32 px image becomes 256 px: each pixel an 8 x 8 block (np.kron), nothing smoothed."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = np.asarray(upscale(Image.fromarray(pixels)))
    assert big.shape == (256, 256, 3)
    np.testing.assert_array_equal(big, np.kron(pixels, np.ones((8, 8, 1), dtype=np.uint8)))
    # in the grid: the cell is that enlarged image, pasted at (pad, pad) without a title
    grid = np.asarray(make_grid([Image.fromarray(pixels)], pad=2))
    np.testing.assert_array_equal(grid[2 : 2 + 256, 2 : 2 + 256], big)
    # large images stay as they are; min_cell=0 keeps small ones as they are too
    assert upscale(Image.new("RGB", (512, 384))).size == (512, 384)
    assert make_grid([Image.new("RGB", (32, 32))], pad=0, min_cell=0).size == (32, 32)
    assert upscale(Image.new("RGB", (64, 100))).size == (256, 400)  # short side to >= MIN_CELL
    assert MIN_CELL == 256
