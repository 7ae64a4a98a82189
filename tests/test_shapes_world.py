"""Scenes, renderer and caption kinds of the shapes world."""

from __future__ import annotations

import random

import numpy as np
import pytest

from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption, web_caption
from t2i_recap.shapes.parser import parse_caption
from t2i_recap.shapes.render import object_mask, render
from t2i_recap.shapes.world import COLORS, MAX_OBJECTS, SHAPES, Obj, Scene, relation, sample_scene


def _scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_sample_scene_is_deterministic_and_seed_dependent():
    assert _scenes(7, 50) == _scenes(7, 50)
    assert _scenes(7, 50) != _scenes(8, 50)


def test_scenes_are_valid_and_cover_the_world():
    scenes = _scenes(0, 2000)
    sizes = {len(s) for s in scenes}
    assert sizes == set(range(1, MAX_OBJECTS + 1))
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(COLORS)
    assert any(max(s.counts().values()) >= 2 for s in scenes), "counting phrases need repeats"
    for s in scenes[:200]:
        assert len({o.cell for o in s.objects}) == len(s)
        assert Scene.from_dict(s.to_dict()) == s


def test_scene_rejects_shared_cells_and_bad_objects():
    with pytest.raises(ValueError, match="share a cell"):
        Scene((Obj(0, 0, "circle", "red", "small"), Obj(0, 0, "square", "blue", "large")))
    with pytest.raises(ValueError, match="unknown colour"):
        Obj(0, 0, "circle", "pink", "small")
    with pytest.raises(ValueError, match="off the 3x3 grid"):
        Obj(3, 0, "circle", "red", "small")


def test_relations_are_antisymmetric():
    a, b = Obj(0, 0, "circle", "red", "small"), Obj(2, 1, "square", "blue", "large")
    assert relation(a, b) == ["left of", "above"]
    assert relation(b, a) == ["right of", "below"]


def test_render_is_deterministic_and_objects_stay_in_their_cells():
    scene = _scenes(3, 1)[0]
    assert np.array_equal(np.asarray(render(scene, 32)), np.asarray(render(scene, 32)))
    assert render(scene, 48).size == (48, 48)
    with pytest.raises(ValueError, match="too small"):
        render(scene, 8)
    for res in (24, 32, 40):
        side = res / 3
        mask = object_mask(Obj(1, 2, "square", "red", "large"), res)
        ys, xs = np.nonzero(mask)
        assert ys.min() >= round(side) and ys.max() < round(2 * side)
        assert xs.min() >= round(2 * side)


def test_gold_captions_use_every_template_and_name_every_object():
    rng = random.Random(1)
    for scene in _scenes(1, 100):
        for template in GOLD_TEMPLATES:
            text = gold_caption(scene, rng, template)
            for o in scene.objects:
                assert o.color in text and o.shape in text
    with pytest.raises(ValueError, match="unknown gold caption template"):
        gold_caption(_scenes(1, 1)[0], rng, "nope")


def test_web_captions_are_short_noisy_and_name_at_most_one_object():
    rng = random.Random(2)
    wrong_colour = 0
    for scene in _scenes(2, 2000):
        web = web_caption(scene, rng)
        gold = gold_caption(scene, rng)
        assert gold not in web and len(web.split()) <= 8
        parsed = parse_caption(web)
        # Never a full description: no object with size and position, at most one named.
        assert parsed.objects == []
        assert len(parsed.partial) <= 1
        assert sum(web.lower().count(shape) for shape in SHAPES) <= 1
        for part in parsed.partial:
            if "color" in part and "shape" in part:
                wrong_colour += (part["color"], part["shape"]) not in scene.counts()
    assert 0 < wrong_colour < 600, "some web captions name a wrong colour, most do not"


def test_hard_negatives_keep_the_bag_of_objects_but_change_the_scene():
    """perturb_scene: always a different scene, with the same number of objects; a move keeps every
    (shape, colour, size), a swap keeps the cells and the multiset of colours/shapes."""
    from collections import Counter

    from t2i_recap.shapes.scene_batches import perturb_scene

    rng = random.Random(5)
    kinds = Counter()
    for _ in range(500):
        scene = sample_scene(rng)
        variant = perturb_scene(scene, rng)
        assert variant != scene and len(variant) == len(scene)
        bag = lambda s: Counter((o.shape, o.color, o.size) for o in s.objects)  # noqa: E731
        cells = lambda s: {o.cell for o in s.objects}  # noqa: E731
        if bag(variant) == bag(scene):  # moved, or objects exchanged between the same cells
            kinds["move"] += 1
        else:
            assert cells(variant) == cells(scene)
            if len(scene) > 1:
                kinds["swap"] += 1
                assert Counter(o.color for o in variant.objects) == Counter(o.color for o in scene.objects)
                assert Counter(o.shape for o in variant.objects) == Counter(o.shape for o in scene.objects)
            else:
                kinds["recolour"] += 1
    assert kinds["move"] > 100 and kinds["swap"] > 100 and kinds["recolour"] > 10


def test_clip_batches_hold_distinct_scenes_with_hard_negatives():
    from t2i_recap.shapes.train_clip import ClipTrainConfig, training_batch

    cfg = ClipTrainConfig(batch_size=64, hard_negatives=0.5)
    held_out = [sample_scene(random.Random(i)) for i in range(50)]
    batch = training_batch(random.Random(0), cfg, held_out)
    assert len(batch) == 64 and len(set(batch)) == 64  # duplicates would be false negatives
    assert not set(batch) & set(held_out)
