"""The oracle reads images back into scene graphs: exact on clean renders, sensible when degraded."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from t2i_recap.shapes.oracle import MIN_EXACT_RESOLUTION, read_cells, read_scene
from t2i_recap.shapes.render import render
from t2i_recap.shapes.world import BACKGROUND, Obj, Scene, sample_scene


def _scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def _jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _cell_agreement(scenes: list[Scene], degrade, resolution: int) -> float:
    """Share of (scene, cell) pairs read exactly (empty or the same object)."""
    hits = 0
    for scene in scenes:
        truth = {o.cell: o for o in scene.objects}
        hits += sum(truth.get((c.row, c.col)) == c.obj for c in read_cells(degrade(render(scene, resolution))))
    return hits / (9 * len(scenes))


def test_exact_on_1000_random_clean_scenes_at_32px():
    wrong = [s for s in _scenes(0, 1000) if read_scene(render(s, 32)) != s]
    assert not wrong, f"{len(wrong)} of 1000 misread, first: {wrong[0]}"


@pytest.mark.parametrize("resolution", [MIN_EXACT_RESOLUTION, 24, 40, 48, 64])
def test_exact_at_other_resolutions(resolution):
    for scene in _scenes(resolution, 60):
        assert read_scene(render(scene, resolution)) == scene


def test_every_object_kind_in_every_cell_reads_exactly():
    for row in range(3):
        for col in range(3):
            for shape in ("circle", "square", "triangle"):
                for color in ("red", "green", "blue", "yellow", "purple", "orange"):
                    for size in ("small", "large"):
                        scene = Scene((Obj(row, col, shape, color, size),))
                        assert read_scene(render(scene, 32)) == scene


def test_clean_cells_are_fully_confident():
    cells = read_cells(render(_scenes(5, 1)[0], 32))
    assert [(c.row, c.col) for c in cells] == [(r, c) for r in range(3) for c in range(3)]
    assert all(c.confidence == 1.0 for c in cells)


def test_degraded_images_read_sensibly():
    scenes = _scenes(1, 150)
    assert _cell_agreement(scenes, _jpeg, 32) >= 0.98
    assert _cell_agreement(scenes, lambda im: im.filter(ImageFilter.GaussianBlur(0.8)), 32) >= 0.98
    noise = np.random.default_rng(0)

    def noisy(im):
        arr = np.asarray(im, dtype=np.float32) + noise.normal(0, 12, (im.height, im.width, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    assert _cell_agreement(scenes, noisy, 32) >= 0.98
    # A VAE-like bottleneck (half resolution and back) smooths small squares towards circles.
    assert _cell_agreement(scenes, lambda im: im.resize((16, 16), Image.BOX).resize((32, 32), Image.BILINEAR),
                           32) >= 0.98
    # Upsampled (a model sampling at twice the training resolution).
    assert _cell_agreement(scenes, lambda im: im.resize((64, 64), Image.BICUBIC), 32) >= 0.98
    # Off the renderer's pixel grid by one pixel.
    assert _cell_agreement(scenes, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, -1, 0, 1, 1),
                                                           fillcolor=BACKGROUND), 32) >= 0.98


def test_blur_lowers_confidence_and_background_drift_is_tolerated():
    scene = Scene((Obj(1, 1, "triangle", "blue", "small"), Obj(0, 2, "circle", "orange", "large")))
    blurred = read_cells(render(scene, 32).filter(ImageFilter.GaussianBlur(1.0)))
    assert min(c.confidence for c in blurred if c.obj is not None) < 1.0
    shifted = np.clip(np.asarray(render(scene, 32), dtype=np.int16) - 25, 0, 255).astype(np.uint8)
    assert read_scene(shifted) == scene


def test_inputs_other_than_square_rgb():
    scene = _scenes(9, 1)[0]
    image = render(scene, 32)
    assert read_scene(np.asarray(image)) == scene
    assert read_scene(image.convert("RGBA")) == scene
    assert read_scene(image.resize((64, 48), Image.NEAREST)) == scene  # non-square: squared first
    assert read_scene(Image.new("RGB", (32, 32), BACKGROUND)) == Scene(())
    with pytest.raises(ValueError, match="too small"):
        read_scene(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="uint8"):
        read_scene(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="PIL image"):
        read_scene("image.png")


def test_noise_reads_as_some_scene_without_crashing():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = read_scene(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert isinstance(scene, Scene)
