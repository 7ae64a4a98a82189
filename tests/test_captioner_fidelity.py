"""Caption fidelity: exact on gold captions, and every planted error lands in its own column."""

from __future__ import annotations

import json
import random

import pytest

from t2i_recap.captioner import fidelity
from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption
from t2i_recap.shapes.world import Obj, Scene, sample_scene

TWO = Scene((Obj(0, 0, "circle", "red", "small"), Obj(2, 2, "square", "blue", "large")))


def test_gold_captions_score_exact_in_every_template():
    rng = random.Random(7)
    samples = []
    for i in range(240):
        scene = sample_scene(rng)
        caption = gold_caption(scene, rng, GOLD_TEMPLATES[i % len(GOLD_TEMPLATES)])
        samples.append(fidelity.score_caption(caption, scene, f"k{i}"))
    summary = fidelity.summarize(samples)
    assert summary["overall"]["exact_match"] == 1.0
    assert set(summary["overall"]["errors"].values()) == {0}
    assert set(summary["by_object_count"]) == {"1", "2", "3", "4"}
    assert sum(v["captions"] for v in summary["by_object_count"].values()) == 240


@pytest.mark.parametrize("caption, kind", [
    ("A picture of a small green circle in the top left corner and a large blue square in the lower right corner.",
     "wrong_color"),
    ("A picture of a small red triangle in the top left corner and a large blue square in the lower right corner.",
     "wrong_shape"),
    ("A picture of a large red circle in the top left corner and a large blue square in the lower right corner.",
     "wrong_size"),
    ("A picture of a small red circle in the top right corner and a large blue square in the lower right corner.",
     "wrong_position"),
    ("A picture of a small red circle in the top left corner, a large blue square in the lower right corner "
     "and a small yellow triangle in the center.", "hallucinated"),
    ("A picture of a small red circle in the top left corner.", "missed"),
    ("A picture of a small red circle in the top left corner and a large blue square in the lower right corner. "
     "The red circle is below the blue square.", "false_relations"),
])
def test_planted_errors_are_caught(caption, kind):
    s = fidelity.score_caption(caption, TWO)
    assert not s.exact
    assert s.errors[kind] == 1
    assert sum(s.errors.values()) == 1, s.errors  # nothing else is blamed


def test_swapped_colours_are_two_wrong_attributes_not_missing_objects():
    caption = ("A picture of a small blue circle in the top left corner and a large red square "
               "in the lower right corner.")
    s = fidelity.score_caption(caption, TWO)
    assert s.errors["wrong_color"] == 2 and s.errors["missed"] == 0 and s.errors["hallucinated"] == 0


def test_garbage_and_half_described_objects_are_not_exact():
    s = fidelity.score_caption("zzz qqq", TWO)
    assert not s.exact and s.errors["missed"] == 2 and s.problems
    s = fidelity.score_caption("A picture of a red circle in the top left corner and a large blue square "
                               "in the lower right corner.", TWO)  # the circle's size is missing
    assert not s.exact and s.errors["hallucinated"] + s.errors["missed"] >= 1


def test_match_objects_prefers_most_pairs_then_fewest_errors():
    a, b = TWO.objects
    moved = Obj(1, 1, "circle", "red", "small")
    pairs, missed, extra = fidelity.match_objects([a, b], [moved, b])
    assert len(pairs) == 2 and not missed and not extra
    far = Obj(1, 1, "triangle", "green", "large")  # differs in all four attributes: not a match
    pairs, missed, extra = fidelity.match_objects([a], [far])
    assert not pairs and missed == [a] and extra == [far]


def test_report_files_and_escaping(tmp_path):
    samples = [fidelity.score_caption("<script>alert(1)</script> | a red circle", TWO, "k0"),
               fidelity.score_caption(gold_caption(TWO, random.Random(0)), TWO, "k1")]
    summary = fidelity.summarize(samples)
    fidelity.write_report(summary, samples, tmp_path, {"shards": "s", "captions_from": "m"})
    data = json.loads((tmp_path / "fidelity.json").read_text())
    assert data["overall"]["exact_match"] == 0.5 and data["by_object_count"]["2"]["captions"] == 2
    md = (tmp_path / "fidelity.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md and "| 2 object(s) | 2 | 50.0% |" in md
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_cli_scores_json_captions_and_sidecars(shapes_shards, tmp_path):
    from t2i_recap.captioner.writer import Row, write_sidecar

    out = tmp_path / "gold"
    assert fidelity.main(["--shards", str(shapes_shards), "--caption-field", "gold_caption", "--out", str(out)]) == 0
    data = json.loads((out / "fidelity.json").read_text())
    assert data["overall"]["captions"] == 16 and data["overall"]["exact_match"] == 1.0  # the curated ones
    assert data["uncaptioned_keys"] == 48
    # Sidecars: one right caption, one wrong, one skipped row (not scored).
    truths, _, _ = fidelity.read_truth(str(shapes_shards), 1, 2)
    (k1, s1), (k2, s2), (k3, _) = list(truths.items())[:3]
    rows = [Row(k1, re_caption=gold_caption(s1, random.Random(1))), Row(k2, re_caption="a tiny cat"),
            Row(k3, status="skipped", error="bad image")]
    write_sidecar(tmp_path / "sc" / "00000.parquet", rows, {"model": "m"})
    out = tmp_path / "side"
    assert fidelity.main(["--shards", str(shapes_shards), "--sidecars", str(tmp_path / "sc"), "--out", str(out),
                          "--max-objects", "2"]) == 0
    data = json.loads((out / "fidelity.json").read_text())
    assert data["overall"]["captions"] == 2 and data["overall"]["exact_match"] == 0.5
    assert data["objects"] == [1, 2]
