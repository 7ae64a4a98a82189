"""The caption parser: exact on every gold caption, lenient (problems, never crashes) on others."""

from __future__ import annotations

import random

import pytest

from t2i_recap.shapes.captions import (
    GOLD_TEMPLATES,
    RELATION_WORDS,
    ROW_WORDS,
    SIZE_WORDS,
    gold_caption,
)
from t2i_recap.shapes.parser import parse_caption, tokenize
from t2i_recap.shapes.world import Obj, Scene, sample_scene


@pytest.fixture(scope="module")
def gold_corpus() -> list[tuple[Scene, str, str]]:
    rng = random.Random(0)
    out = []
    for _ in range(1500):
        scene = sample_scene(rng)
        out.extend((scene, template, gold_caption(scene, rng, template)) for template in GOLD_TEMPLATES)
    return out


def test_every_gold_template_round_trips(gold_corpus):
    failures = []
    for scene, template, text in gold_corpus:
        parsed = parse_caption(text)
        if parsed.scene != scene or parsed.problems:
            failures.append((template, text, parsed.problems))
    assert not failures, f"{len(failures)} gold captions misparsed, first: {failures[0]}"


def test_round_trip_corpus_covers_every_synonym(gold_corpus):
    """Guards the round-trip test: every phrasing the generator has must have been parsed."""
    words = {w for _, _, text in gold_corpus for w in tokenize(text)}
    text = " ".join(t for _, _, t in gold_corpus).lower()
    synonyms = {w for ws in SIZE_WORDS.values() for w in ws} | {w for ws in ROW_WORDS.values() for w in ws}
    assert synonyms <= words
    assert all(phrase in text for phrases in RELATION_WORDS.values() for phrase in phrases)
    for word in ("sits", "side", "corner", "middle", "center", "two", "three", "four", "shapes"):
        assert word in words
    assert {template for _, template, _ in gold_corpus} == set(GOLD_TEMPLATES)


def test_relations_are_read_and_checked():
    parsed = parse_caption("A picture of a small red circle at the top left and a large blue square "
                           "at the bottom right. The red circle is to the left of the blue square.")
    assert parsed.clean
    assert parsed.relations == [("red circle", "left of", "blue square", True)]
    wrong = parse_caption("A small red circle at the top left and a large blue square at the bottom "
                          "right. The red circle is below the blue square.")
    assert wrong.scene is not None and wrong.relations[0][3] is False
    assert any("contradicts" in p for p in wrong.problems)
    missing = parse_caption("A small red circle at the top left. The red circle is above the green triangle.")
    assert missing.relations[0][3] is None and any("green triangle" in p for p in missing.problems)


def test_case_insensitive_and_punctuation_tolerant():
    parsed = parse_caption("A BIG Green TRIANGLE in the Bottom Left corner , a little yellow circle at the top")
    assert parsed.clean
    assert parsed.scene == Scene((Obj(2, 0, "triangle", "green", "large"), Obj(0, 1, "circle", "yellow", "small")))


def test_partial_objects_and_unknown_words_are_problems_not_crashes():
    parsed = parse_caption("The image shows a tiny red circle in the top left corner and a big blue square.")
    assert parsed.objects == []
    assert {"color": "blue", "shape": "square", "size": "large"} in parsed.partial
    assert any("unknown words" in p and "tiny" in p for p in parsed.problems)
    assert any("has no position" in p for p in parsed.problems)
    assert any("has no size" in p for p in parsed.problems)


def test_conflicting_objects_give_no_scene():
    parsed = parse_caption("A small red circle in the center and a large green square in the middle.")
    assert len(parsed.objects) == 2 and parsed.scene is None
    assert any("share a cell" in p for p in parsed.problems)


def test_counts_are_checked():
    short = parse_caption("There are three shapes: a small red circle in the center.")
    assert short.declared_count == 3 and any("declares 3" in p for p in short.problems)
    group = parse_caption("Two red circles, a small one at the top.")
    assert len(group.objects) == 1 and any("lists 1 members" in p for p in group.problems)
    orphan = parse_caption("A small one at the top.")
    assert orphan.objects == [] and any("refers to no group" in p for p in orphan.problems)
    positions = parse_caption("A small red circle at the top bottom.")
    assert any("contradicting position" in p for p in positions.problems)


def test_degenerate_text():
    assert parse_caption("").scene == Scene(())
    assert parse_caption("IMG_2041.jpg").objects == []
    with pytest.raises(TypeError, match="str"):
        parse_caption(None)  # type: ignore[arg-type]


def test_never_raises_on_word_soup():
    rng = random.Random(3)
    vocab = ("a an one two three four small big large little red green blue yellow purple orange circle "
             "squares triangle triangles shape shapes top bottom upper lower left right center middle "
             "in at on is the of and above below beneath to , . : ! ??? 7 xyz repeat").split()
    for _ in range(500):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40)))
        parsed = parse_caption(text)
        assert parsed.scene is None or len(parsed.scene) == len(parsed.objects)
