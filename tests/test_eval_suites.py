"""Prompt suites and exact oracle scoring: gold renders score 100%, noise scores ~0."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from t2i_recap.evaluate.metric_oracle import check_constraints, score_image, score_scene
from t2i_recap.evaluate.protocol import build_variants, recaptions
from t2i_recap.evaluate.suites import CATEGORIES, load_prompt_file, shapes_suite
from t2i_recap.shapes.render import render
from t2i_recap.shapes.world import Obj, Scene


def test_shapes_suite_is_deterministic_and_covers_every_category():
    a, b = shapes_suite(per_category=10, seed=3), shapes_suite(per_category=10, seed=3)
    assert a.hash() == b.hash()
    assert shapes_suite(per_category=10, seed=4).hash() != a.hash()
    assert a.categories == list(CATEGORIES)
    for cat in CATEGORIES:
        prompts = [r.prompt for r in a.records if r.category == cat]
        assert len(prompts) == min(10, {"single_object": 9}.get(cat, 10))
        assert len(set(prompts)) == len(prompts), f"duplicate prompts in {cat}"
    dense = [r for r in a.records if r.category == "dense"]
    assert all(3 <= len(r.scene["objects"]) <= 4 for r in dense)
    assert [r.index for r in a.records] == list(range(len(a.records)))


def test_every_gold_scene_meets_its_constraints():
    suite = shapes_suite(per_category=40, seed=1)
    for r in suite.records:
        assert score_scene(r.gold_scene(), r.constraints)["correct"] == 1.0, r


@pytest.mark.parametrize("resolution", [24, 32, 64])
def test_gold_renders_score_100_percent_through_the_oracle(resolution):
    suite = shapes_suite(per_category=8, seed=2)
    scores = [score_image(render(r.gold_scene(), resolution), r.constraints) for r in suite.records]
    assert all(s["correct"] == 1.0 and s["fraction"] == 1.0 for s in scores)


def test_noise_images_score_near_zero():
    suite = shapes_suite(per_category=8, seed=2)
    rng = np.random.default_rng(0)
    correct = [score_image(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), r.constraints)["correct"]
               for r in suite.records for _ in range(2)]
    assert np.mean(correct) <= 0.05


def test_blank_image_fails_everything():
    suite = shapes_suite(per_category=4)
    blank = render(Scene(()), 32)
    assert all(score_image(blank, r.constraints)["correct"] == 0.0 for r in suite.records)


def _scene(*objs):
    return Scene(tuple(Obj(*o) for o in objs))


def test_constraint_semantics_catch_the_classic_failures():
    red_circle = {"shape": "circle", "color": "red"}
    blue_square = {"shape": "square", "color": "blue"}
    count3 = {"type": "count", "shape": "circle", "color": "red", "size": None, "n": 3, "exact": True}
    three = _scene((0, 0, "circle", "red", "small"), (0, 1, "circle", "red", "large"), (0, 2, "circle", "red", "small"))
    four = _scene(*[(0, c, "circle", "red", "small") for c in range(3)], (1, 0, "circle", "red", "small"))
    assert check_constraints(three, [count3]) == [True]
    assert check_constraints(four, [count3]) == [False]  # counting is exact
    left = {"type": "relation", "a": red_circle, "rel": "left of", "b": blue_square}
    ok = _scene((1, 0, "circle", "red", "small"), (1, 2, "square", "blue", "small"))
    swapped = _scene((1, 2, "circle", "red", "small"), (1, 0, "square", "blue", "small"))
    assert check_constraints(ok, [left]) == [True] and check_constraints(swapped, [left]) == [False]
    # colour attribution: the colours bound to the wrong shapes fail
    attr = [{"type": "count", "shape": "circle", "color": "red", "size": None, "n": 1, "exact": False},
            {"type": "count", "shape": "square", "color": "blue", "size": None, "n": 1, "exact": False}]
    wrong = _scene((0, 0, "circle", "blue", "small"), (0, 1, "square", "red", "small"))
    assert score_scene(wrong, attr)["correct"] == 0.0 and score_scene(ok, attr)["correct"] == 1.0
    with pytest.raises(ValueError, match="unknown constraint type"):
        check_constraints(ok, [{"type": "vibes"}])


def test_prompt_files_in_every_format(tmp_path):
    rows = [{"id": "a", "prompt": "a red circle", "recaption": "A picture of a small red circle."},
            {"id": "b", "prompt": "two squares", "recaption": ""}, {"id": "c", "prompt": "  "}]
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo squares\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "prompt", "recaption"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"key": "k1", "org_caption": "cat", "re_caption": "A cat on a mat."}]),
                   tmp_path / "p.parquet")
    coco = {"images": [{"id": 7, "file_name": "COCO_7.jpg"}, {"id": 3, "file_name": "COCO_3.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "a dog"}, {"image_id": 7, "id": 2, "caption": "dog!"},
                            {"image_id": 3, "id": 3, "caption": "a bus"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))

    assert [r.prompt for r in load_prompt_file(tmp_path / "p.txt").records] == ["a red circle", "two squares"]
    for name in ("p.jsonl", "p.csv"):
        suite = load_prompt_file(tmp_path / name)
        assert [r.id for r in suite.records] == ["a", "b"]
        assert suite.skipped and suite.skipped[0]["reason"] == "empty or missing prompt"
        texts, meta = recaptions(suite, "auto")
        assert meta["source"] == "column" and texts[0] == "A picture of a small red circle." and not texts[1]
        assert [s["id"] for s in meta["skipped"]] == ["b"]
        variants = build_variants(suite, texts, meta)
        assert [v.name for v in variants] == ["raw", "recap"] and variants[1].prompts[1] is None
    pq_suite = load_prompt_file(tmp_path / "p.parquet")
    assert pq_suite.records[0].id == "k1" and pq_suite.records[0].recaption == "A cat on a mat."
    coco_suite = load_prompt_file(tmp_path / "coco.json")
    assert [(r.id, r.prompt, r.image) for r in coco_suite.records] == [("3", "a bus", "COCO_3.jpg"),
                                                                       ("7", "a dog", "COCO_7.jpg")]


def test_bad_prompt_files_name_the_problem(tmp_path):
    (tmp_path / "x.csv").write_text("title,body\nhello,world\n")
    with pytest.raises(ValueError, match=r"x.csv: no prompt column.*found \['body', 'title'\]"):
        load_prompt_file(tmp_path / "x.csv")
    (tmp_path / "d.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="d.jsonl:2: duplicate prompt id 'a'"):
        load_prompt_file(tmp_path / "d.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "p.yaml").write_text("a")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        load_prompt_file(tmp_path / "p.yaml")


def test_user_constraints_round_trip_through_a_suite_file(tmp_path):
    from t2i_recap.evaluate.suites import write_suite

    suite = shapes_suite(per_category=2)
    write_suite(suite, tmp_path / "s.jsonl")
    again = load_prompt_file(tmp_path / "s.jsonl")
    assert [(r.prompt, r.constraints, r.scene, r.category) for r in again.records] == \
        [(r.prompt, r.constraints, r.scene, r.category) for r in suite.records]
    assert again.hash() == suite.hash()


def test_gold_recaptions_describe_the_target_scene():
    from t2i_recap.shapes.parser import parse_caption

    suite = shapes_suite(per_category=3)
    texts, meta = recaptions(suite, "gold")
    assert meta["source"] == "gold" and all(texts)
    for r, t in zip(suite.records, texts):
        assert parse_caption(t).scene == r.gold_scene()
