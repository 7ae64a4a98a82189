"""generation.image_grid: diffusers' make_image_grid, row by row, a short last row padded white."""

from __future__ import annotations

import pytest
from PIL import Image

from t2i_recap.generation import image_grid


def test_grid_places_images_row_by_row_and_pads_white():
    images = [Image.new("RGB", (4, 3), (10 * (i + 1), 0, 0)) for i in range(5)]
    grid = image_grid(images, cols=2)
    assert grid.size == (8, 9)
    for i in range(5):
        assert grid.getpixel(((i % 2) * 4 + 1, (i // 2) * 3 + 1)) == (10 * (i + 1), 0, 0)
    assert grid.getpixel((5, 7)) == (255, 255, 255)


def test_grid_refuses_no_images_and_bad_cols():
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([], cols=2)
    with pytest.raises(ValueError, match="cols"):
        image_grid([Image.new("RGB", (2, 2))], cols=0)
