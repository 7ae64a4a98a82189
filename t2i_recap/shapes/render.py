"""Render a scene to an RGB image at any resolution, without anti-aliasing (so the oracle is exact)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from t2i_recap.shapes.world import BACKGROUND, COLORS, Obj, Scene

# Half-extent of each size as a fraction of a cell's side.
SIZE_FRACTION = {"small": 0.26, "large": 0.44}


def cell_box(row: int, col: int, resolution: int) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) of a grid cell."""
    side = resolution / 3.0
    return (col * side, row * side, (col + 1) * side, (row + 1) * side)


def object_box(obj: Obj, resolution: int) -> tuple[int, int, int, int]:
    """Integer bounding box of an object, centred in its cell."""
    x0, y0, x1, y1 = cell_box(obj.row, obj.col, resolution)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    half = SIZE_FRACTION[obj.size] * (resolution / 3.0)
    return (round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1)


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, resolution: int, fill=None) -> None:
    fill = COLORS[obj.color] if fill is None else fill
    x0, y0, x1, y1 = object_box(obj, resolution)
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2.0, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # Obj validates shapes; a new shape must be drawn here too
        raise ValueError(f"no drawing for shape {obj.shape!r}")


def render(scene: Scene, resolution: int = 32) -> Image.Image:
    if resolution < 12:
        raise ValueError(f"resolution {resolution} is too small to draw a 3x3 grid of shapes (min 12)")
    img = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, resolution)
    return img


def object_mask(obj: Obj, resolution: int) -> np.ndarray:
    """Boolean mask of the pixels an object covers when drawn alone."""
    img = Image.new("L", (resolution, resolution), 0)
    draw_object(ImageDraw.Draw(img), obj, resolution, fill=255)
    return np.asarray(img) > 0
