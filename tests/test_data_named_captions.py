"""Named captions with weights: per-sample draws match the weights, fallbacks are counted, list-valued
fields, derived first sentences, the p shorthand draws what it always drew, the cache holds every
named caption, and a named-caption run resumes exactly."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from fixtures_train import train_config_dict
from t2i_recap.caption_specs import CaptionSpecError, first_sentence, first_things, lead, listing, no_positions, short
from t2i_recap.config import ConfigError, from_dict
from t2i_recap.data import DataConfig, Skip, WebDatasetSource
from t2i_recap.mixing import NAMED_EMPTY, MixingConfig, choose_named
from t2i_recap.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """A binomial count within `sigmas` standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_per_sample_draws_match_the_weights():
    n = 200_000
    has = {name: torch.ones(n, dtype=torch.bool) for name in ("a", "b", "c")}
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}  # need not sum to 1
    choice, counts = choose_named(has, weights, 0.1, torch.Generator().manual_seed(3))
    assert choice.names == ("a", "b", "c")
    assert _within(counts.empty, n, 0.1)
    for i, (name, w) in enumerate(weights.items()):
        assert counts.chosen[name] == int((choice.index == i).sum())
        assert _within(counts.chosen[name], n, 0.9 * w / 10), (name, counts.chosen)
    assert counts.fallbacks == {} and counts.total() == n


def test_a_missing_caption_falls_back_by_weight_and_is_counted():
    n = 100_000
    full, none = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}
    choice, counts = choose_named({"a": full, "b": full, "c": none}, weights, 0.0, torch.Generator().manual_seed(0))
    assert counts.chosen["c"] == 0 and not bool((choice.index == 2).any())
    drawn_c = counts.fallbacks["c->a"] + counts.fallbacks["c->b"]
    assert _within(drawn_c, n, 0.2)
    assert _within(counts.fallbacks["c->a"], drawn_c, 5 / 8)  # among the present ones by weight
    assert _within(counts.chosen["a"], n, 0.5 + 0.2 * 5 / 8)
    # the draws of samples that had their caption do not change when another sample lacks it
    part = full.clone()
    part[::3] = False
    again, _ = choose_named({"a": full, "b": part, "c": none}, weights, 0.0, torch.Generator().manual_seed(0))
    same = part.clone()
    assert torch.equal(choice.index[same & (choice.index != 1)], again.index[same & (choice.index != 1)])
    # only zero-weight captions present: a uniform pick among them, still counted
    choice, counts = choose_named({"a": none[:10], "b": full[:10], "x": full[:10]}, {"a": 1.0}, 0.0,
                                  torch.Generator().manual_seed(1))
    assert set(choice.index.tolist()) <= {1, 2} and sum(counts.fallbacks.values()) == 10


def _legacy_choose(has_original, has_recaption, p, cfg_dropout, generator):
    """The two-caption mixer as it was before named captions (the reference the shorthand must equal)."""
    n = has_original.shape[0]
    want_original = torch.rand(n, generator=generator) < p
    drop = torch.rand(n, generator=generator) < cfg_dropout
    use_original = (want_original & has_original) | (~want_original & ~has_recaption)
    return torch.where(drop, 2, torch.where(use_original, 0, 1))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.2, 0.5, 0.75, 1.0, 1 / 3])
def test_p_shorthand_draws_exactly_what_it_always_drew(p):
    from t2i_recap.mixing import choose

    g = torch.Generator().manual_seed(7)
    has_org, has_re = torch.rand(5000, generator=g) < 0.8, torch.rand(5000, generator=g) < 0.8
    has_re |= ~has_org
    for seed in range(5):
        old = _legacy_choose(has_org, has_re, p, 0.1, torch.Generator().manual_seed(seed))
        new, _ = choose(has_org, has_re, MixingConfig(p=p), torch.Generator().manual_seed(seed))
        named, _ = choose_named({"original": has_org, "recaption": has_re}, MixingConfig(p=p).resolved_weights(),
                                0.1, torch.Generator().manual_seed(seed))
        assert torch.equal(old, new)
        assert torch.equal(torch.where(named.index == NAMED_EMPTY, 2, named.index), old)


def test_mixing_config_checks():
    with pytest.raises(ValueError, match="both set"):
        MixingConfig(p=0.2, weights={"recaption": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        MixingConfig(weights={"recaption": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        MixingConfig(weights={"recaption": -1.0, "original": 2.0})
    assert MixingConfig(p=0.3).resolved_weights() == {"original": 0.3, "recaption": 0.7}


REAL_LOOKING = [
    ("The image shows a golden retriever lying on a wooden porch. Behind it, a red door is partly open.",
     "The image shows a golden retriever lying on a wooden porch."),
    ("A vintage poster for St. Louis, Mo. advertising the 1904 World's Fair. The text reads \"Meet me in St. Louis!\"",
     "A vintage poster for St. Louis, Mo. advertising the 1904 World's Fair."),
    ("Close-up of a 3.5 mm audio jack, e.g. on headphones, on a white desk! Cables trail off to the left.",
     "Close-up of a 3.5 mm audio jack, e.g. on headphones, on a white desk!"),
    ("Portrait of J. R. R. Tolkien smiling... wearing a tweed jacket. He holds a pipe.",
     "Portrait of J. R. R. Tolkien smiling... wearing a tweed jacket."),
    ("a single caption with no final stop", "a single caption with no final stop"),
    ("Is this a cat? No, it is a fox.", "Is this a cat?"),
    # all lower case (the shapes captioner's output): no capital starts the next sentence
    ("a picture of a large orange triangle at the top left and a small blue circle. the orange triangle is above "
     "the blue circle.", "a picture of a large orange triangle at the top left and a small blue circle."),
    ("two red squares... side by side. the left one is larger.", "two red squares... side by side."),
    ("a 3.5 mm jack on a desk. it is black.", "a 3.5 mm jack on a desk."),
]


@pytest.mark.parametrize("text,first", REAL_LOOKING)
def test_first_sentence_of_real_looking_recaptions(text, first):
    assert first_sentence(text) == first


NO_POSITIONS = [
    # the shapes captioner's phrasings (lower case, several objects, a relation sentence)
    ("a picture of a large orange triangle at the top left, a small orange triangle in the center and a small blue "
     "circle at the bottom left. the orange triangle is above the blue circle.",
     "a picture of a large orange triangle, a small orange triangle and a small blue circle. the orange triangle is "
     "above the blue circle."),
    ("an image showing two yellow triangles, a big one on the left and a small one at the bottom.",
     "an image showing two yellow triangles, a big one and a small one."),
    ("A small red circle sits in the center. A big blue square is at the middle left.",
     "A small red circle. A big blue square."),
    ("a picture of a big blue triangle in the upper left corner.", "a picture of a big blue triangle."),
    # relations stay, whether "to the left of" or "on the left of"
    ("The red circle is to the left of the blue square.", "The red circle is to the left of the blue square."),
    ("In the center of the image, a man rides a bicycle on the street. A car is parked on the left of the road.",
     "A man rides a bicycle on the street. A car is parked on the left of the road."),
    ("A dog lies on the grass in the foreground, with trees in the background.", "A dog lies on the grass, with trees."),
    ("A photo taken at the top of a mountain.", "A photo taken at the top of a mountain."),
    ("in the center.", None),
    (None, None),
]


@pytest.mark.parametrize("text,short", NO_POSITIONS)
def test_no_positions_drops_where_things_are_and_keeps_relations(text, short):
    assert no_positions(text) == short


def test_no_positions_on_every_gold_caption_template_keeps_every_object():
    """Over the shapes world's caption grammar: no absolute-position word is left, and every object's
    size, colour and shape words and every relation sentence are still there."""
    import random

    from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption
    from t2i_recap.shapes.world import sample_scene

    rng = random.Random(0)
    for i in range(400):
        scene = sample_scene(rng)
        text = gold_caption(scene, rng, GOLD_TEMPLATES[i % len(GOLD_TEMPLATES)])
        short = no_positions(text)
        words = short.lower().replace(".", " ").replace(",", " ").split()
        assert not {"corner", "center", "middle", "top", "bottom", "upper", "lower"} & set(words), (text, short)
        assert sum(w in ("left", "right") for w in words) == text.lower().count(" left of") + text.lower().count(" right of")
        for o in scene.objects:
            assert o.color in words and (o.shape in words or o.shape + "s" in words), (text, short)
        relations = [s for s in text.split(". ") if s.startswith("The ")]
        assert all(r.rstrip(".") in short for r in relations), (text, short)


def test_short_captions_leave_out_colours_sizes_or_both_by_content():
    """`short` over the shapes grammar: positions always go; colours, sizes, both or neither go by
    the caption's hash, each for about a quarter of captions; shapes, counts and relations stay; the
    same caption always gives the same short form; articles agree with what follows."""
    import random

    from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption
    from t2i_recap.shapes.world import COLORS, sample_scene

    rng = random.Random(1)
    kinds = {"neither": 0, "colours": 0, "sizes": 0, "both": 0}
    for i in range(800):
        scene = sample_scene(rng)
        text = gold_caption(scene, rng, GOLD_TEMPLATES[i % len(GOLD_TEMPLATES)])
        out = short(text)
        assert out == short(text) and out != text
        words = set(out.lower().replace(".", " ").replace(",", " ").replace(":", " ").split())
        ones = " one " in text or " ones " in text  # "a big one": the size word stays there
        colours, sizes = bool(set(COLORS) & words), bool({"small", "little", "large", "big"} & words)
        kind = {(True, True): "neither", (False, True): "colours", (True, False): "sizes", (False, False): "both"}
        if not ones:
            kinds[kind[(colours, sizes)]] += 1
        for o in scene.objects:
            assert o.shape in words or o.shape + "s" in words, (text, out)
        assert not {"corner", "center", "middle", "upper", "lower"} & words, (text, out)
        assert not re.search(r"\ban [b-df-hj-np-tv-z]|\ba [aeiou]", out, re.IGNORECASE), (text, out)
    n = sum(kinds.values())
    assert all(_within(k, n, 0.25) for k in kinds.values()), kinds
    assert short("A tall man in a red shirt rides a big blue bicycle on the left side of the image.") in {
        "A tall man in a red shirt rides a big blue bicycle.", "A tall man in a shirt rides a big bicycle.",
        "A tall man in a red shirt rides a blue bicycle.", "A tall man in a shirt rides a bicycle."}
    assert short(None) is None and short("at the top.") is None


LEADS = [
    # (caption, the leads it may give: one thing or two, colours/sizes/both/neither left out)
    ("A picture of a big red circle in the top left corner, a small blue square at the bottom and a green "
     "triangle on the right. The red circle is above the blue square.",
     {"A picture of a big red circle", "A picture of a big circle", "A picture of a red circle", "A picture of a circle",
      "A picture of a big red circle and a small blue square", "A picture of a big circle and a small square",
      "A picture of a red circle and a blue square", "A picture of a circle and a square"}),
    ("an image showing two yellow triangles, a big one on the left and a small one at the bottom and a small "
     "orange circle at the bottom center.",
     {"an image showing two yellow triangles", "an image showing two triangles",
      "an image showing two yellow triangles and a small orange circle", "an image showing two triangles and a small circle",
      "an image showing two yellow triangles and an orange circle", "an image showing two triangles and a circle"}),
    ("There are three shapes: a little green square in the center, a large purple circle on the left and a big red "
     "triangle at the top.",
     {"a little green square", "a green square", "a little square", "a square",
      "a little green square and a large purple circle", "a green square and a purple circle",
      "a little square and a large circle", "a square and a circle"}),
    ("A large blue circle sits in the upper right corner. A small red square is on the left side.",
     {"A large blue circle", "A blue circle", "A large circle", "A circle"}),
]


@pytest.mark.parametrize("text,leads", LEADS)
def test_lead_names_the_first_one_or_two_things_without_positions(text, leads):
    assert lead(text) in leads and lead(text) == lead(text)


def test_leads_over_the_shapes_grammar_name_one_or_two_of_the_scenes_things():
    """`lead` over every gold template: one or two things (about half each where a listing names two
    groups or more), each a thing of the scene, never a position, a relation or a closing stop; the
    attribute choice is spread over the four kinds like `short`'s."""
    import random

    from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption
    from t2i_recap.shapes.world import COLORS, SHAPES, sample_scene

    rng = random.Random(2)
    counts, attributes = {1: 0, 2: 0}, set()
    for i in range(800):
        scene = sample_scene(rng)
        text = gold_caption(scene, rng, GOLD_TEMPLATES[i % len(GOLD_TEMPLATES)])
        out = lead(text)
        words = out.lower().split()
        assert not out.endswith(".") and not {"corner", "center", "middle", "top", "bottom", "left", "right",
                                               "above", "below", "beneath", "one", "shapes:"} & set(words), (text, out)
        named = [w.rstrip("s") for w in words if w.rstrip("s") in SHAPES]
        assert named and set(named) <= {o.shape for o in scene.objects}, (text, out)
        assert len(named) == out.count(" and ") + 1, (text, out)
        if len({(o.color, o.shape) for o in scene.objects}) >= 2 and i % len(GOLD_TEMPLATES) != 3:
            counts[len(named)] += 1  # the "sentences" template's first sentence names one thing
        attributes.add((bool(set(COLORS) & set(words)), bool({"small", "little", "large", "big"} & set(words))))
    assert all(_within(k, sum(counts.values()), 0.5) for k in counts.values()), counts
    assert attributes == {(True, True), (True, False), (False, True), (False, False)}
    assert lead(None) is None and lead("In the center.") is None


def test_listing_names_every_thing_of_the_first_sentence_and_nothing_else():
    text = ("There are three shapes: two yellow triangles, a big one on the left and a small one at the bottom, "
            "a little green square in the center and a large purple circle on the left. The green square is above "
            "the purple circle.")
    assert listing(text) in {"two yellow triangles, a little green square and a large purple circle",
                             "two triangles, a little square and a large circle",
                             "two yellow triangles, a green square and a purple circle",
                             "two triangles, a square and a circle"}
    assert listing("A large blue circle sits in the upper right corner. A red square is on the left.") in {
        "A large blue circle", "A blue circle", "A large circle", "A circle"}
    assert listing(None) is None and listing("In the center.") is None

    import random

    from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption
    from t2i_recap.shapes.world import SHAPES, sample_scene

    rng = random.Random(3)
    for i in range(400):
        scene = sample_scene(rng)
        template = GOLD_TEMPLATES[i % len(GOLD_TEMPLATES)]
        text = gold_caption(scene, rng, template)
        out = listing(text)
        words = out.lower().replace(",", " ").split()
        named = [w.rstrip("s") for w in words if w.rstrip("s") in SHAPES]
        groups = len({(o.color, o.shape) for o in scene.objects})
        assert len(named) == (1 if template == "sentences" else groups), (text, out)
        assert not out.endswith(".") and not {"corner", "center", "middle", "top", "bottom", "left", "right",
                                               "above", "below", "one"} & set(words), (text, out)
        assert out == listing(text) and (lead(text) == out or out.startswith(lead(text).split(" and ")[0]))
        things = first_things(text)  # the lead's things with every attribute kept
        assert len(things.split(" and ")) == len(lead(text).split(" and ")), (text, things)
        colours = [w for w in things.lower().split() if w in {o.color for o in scene.objects}]
        assert len(colours) == len(things.split(" and ")), (text, things)  # one colour word per thing


def test_first_things_is_the_lead_with_its_colours_and_sizes():
    text = LEADS[0][0]
    assert first_things(text) in {"A picture of a big red circle", "A picture of a big red circle and a small blue square"}
    assert _drop_attrs(first_things(text)) == _drop_attrs(lead(text))
    assert first_things(None) is None and first_things("At the top.") is None


def _drop_attrs(text: str) -> str:
    return " ".join(w for w in text.split() if w not in {"big", "small", "red", "blue", "a", "an"})


def test_named_captions_list_fields_and_derivations(train_shards):
    shards, side = train_shards
    cfg = DataConfig(shards=str(shards), recaption_dir=str(side), resolution=16, captions={
        "first_sentence": "first_sentence:recaption", "gold0": "json:gold_captions[0]",
        "first_of_first": "first_sentence:gold0", "placeless": "no_positions:gold0"})
    assert list(cfg.caption_specs()) == ["original", "recaption", "first_sentence", "gold0", "first_of_first",
                                         "placeless"]
    src = WebDatasetSource(cfg)
    out = [src.decode(r) for r in src.records(0)]
    assert all(not isinstance(o, Skip) for o in out)
    for o in out:
        assert o["first_of_first"] == first_sentence(o["gold0"]) and o["gold0"].startswith(o["first_of_first"])
        assert o["placeless"] == no_positions(o["gold0"]) and len(o["placeless"]) < len(o["gold0"])
        if o["recaption"] is None:  # a failed sidecar row: no recaption, so no first sentence of it
            assert o["first_sentence"] is None
        else:
            assert o["recaption"].startswith(o["first_sentence"]) and o["first_sentence"].endswith(".")
    assert sum(len(o["first_of_first"]) < len(o["gold0"]) for o in out) >= 3  # several are longer than one sentence
    listed = WebDatasetSource(DataConfig(shards=str(shards), resolution=16, recaption="json:gold_captions"))
    first = listed.decode(next(listed.records(0)))
    assert isinstance(first, Skip) and "json:gold_captions[0]" in first.reason
    # one gold caption per sample: element 1 finds nothing in the shard, an error naming it
    one = WebDatasetSource(DataConfig(shards=str(shards), resolution=16, recaption="json:gold_caption",
                                      captions={"g1": "json:gold_captions[1]"}))
    with pytest.raises(CaptionSpecError, match=r"json:gold_captions\[1\].*g1"):
        list(one.records(0))


def test_several_recaptions_per_image_from_a_list_field(tmp_path):
    from test_train_data import _jpeg, _tar

    recaps = [["First recaption.", "Second recaption."], ["Only one."], [], None]
    _tar(tmp_path / "00000.tar", {
        f"00000000{i}": {"jpg": _jpeg(), "txt": b"alt text", "json": json.dumps({"recaps": r}).encode()}
        for i, r in enumerate(recaps)})
    cfg = DataConfig(shards=str(tmp_path), resolution=16, recaption="json:recaps[0]",
                     captions={"second": "json:recaps[1]"})
    src = WebDatasetSource(cfg)
    out = [src.decode(r) for r in src.records(0)]
    assert [(o["recaption"], o["second"]) for o in out] == [
        ("First recaption.", "Second recaption."), ("Only one.", None), (None, None), (None, None)]
    n = 20_000
    has = {"original": torch.ones(n, dtype=torch.bool), "recaption": torch.ones(n, dtype=torch.bool),
           "second": torch.arange(n) % 2 == 0}  # half the images have a second recaption
    choice, counts = choose_named(has, {"recaption": 1.0, "second": 1.0}, 0.0, torch.Generator().manual_seed(0))
    assert _within(counts.fallbacks["second->recaption"], n, 0.25)  # drawn second, had none: the first one
    assert counts.chosen["original"] == 0  # weight 0, and every sample had a weighted caption


@pytest.mark.parametrize("captions,match", [
    ({"short": "first_sentence:long"}, "not one of the named captions"),
    ({"a": "first_sentence:b", "b": "first_sentence:a"}, "cycle"),
    ({"Bad-Name": "txt"}, "not a usable caption name"),
    ({"pixels": "txt"}, "not a usable caption name"),
    ({"original": None, "recaption": None}, "removes every caption"),
    ({"x": "first_sentence:"}, "takes the name"),
])
def test_bad_named_captions_are_refused(captions, match):
    with pytest.raises((ValueError, CaptionSpecError), match=match):
        DataConfig(shards="x", captions=captions)


def test_weights_must_name_defined_captions(train_assets, train_shards, tmp_path):
    shards, side = train_shards
    raw = train_config_dict(train_assets, shards, tmp_path / "r", side, mixing={"p": 0.0, "weights": {"short": 1.0}})
    with pytest.raises(ConfigError, match="does not define.*short"):
        from_dict(TrainConfig, raw)


NAMED = dict(data={"captions": {"first_sentence": "first_sentence:recaption"}},
             mixing={"p": 0.0, "weights": {"recaption": 0.5, "first_sentence": 0.4, "original": 0.1}})


def test_cache_stores_every_named_caption_and_refuses_other_captions(tmp_path, train_assets, train_shards):
    from t2i_recap import cache
    from t2i_recap.data import build_source

    shards, side = train_shards
    cache_dir = tmp_path / "cache"
    two = from_dict(TrainConfig, train_config_dict(train_assets, shards, tmp_path / "a", side))
    named = from_dict(TrainConfig, train_config_dict(train_assets, shards, tmp_path / "b", side, **NAMED))
    enc = cache.FeatureEncoder(named.features, named.text_encoder)
    # a two-caption config keeps the fingerprint it had (existing caches stay valid)
    assert enc.fingerprint(two.data)["captions"] == {"original": "txt", "recaption": "sidecar:re_caption"}
    src = build_source(named.data)
    fp = cache.write_fingerprint(enc, named.data, cache_dir)
    assert cache.prepare_cache(enc, src, named.data, cache_dir, fp_hash=fp)["built"] == 2
    cached = cache.CacheSource(cache_dir, src.shards, fp)
    rows = [cached.decode(r) for r in cached.records(0)]
    raw = [src.decode(r) for r in src.records(0)]
    assert {"first_sentence_emb", "first_sentence_mask", "has_first_sentence"} <= set(rows[0])
    assert [bool(r["has_first_sentence"]) for r in rows] == [x["first_sentence"] is not None for x in raw]
    # the first sentence is encoded, not the whole recaption
    has = next(i for i, x in enumerate(raw) if x["first_sentence"])
    assert rows[has]["first_sentence_mask"].sum() < rows[has]["recaption_mask"].sum()
    # a cache built for other captions is stale: rebuilt, and never read under the other fingerprint
    src2 = build_source(two.data)
    assert cache.prepare_cache(enc, src2, two.data, cache_dir)["built"] == 2
    with pytest.raises(RuntimeError, match="fingerprint"):
        cache.CacheSource(cache_dir, src.shards, fp)


def test_named_caption_run_resumes_exactly_and_counts(tmp_path, train_assets, train_shards):
    from t2i_recap.trainer import train
    from test_train_loop import _assert_close, _tensors

    shards, side = train_shards

    def cfg(run, steps):
        sections = {**NAMED, "trainer": {"max_steps": steps}, "checkpoint": {"every_steps": 2, "keep": 3}}
        return from_dict(TrainConfig, train_config_dict(train_assets, shards, tmp_path / run, side, **sections))

    straight = train(cfg("straight", 6))
    train(cfg("resumed", 2))
    resumed = train(cfg("resumed", 6), resume="latest")
    for name in ("model", "ema", "optimizer"):
        _assert_close(_tensors(tmp_path / "straight", 6, name), _tensors(tmp_path / "resumed", 6, name))
    assert straight["mix_counts"] == resumed["mix_counts"]
    counts = straight["mix_counts"]
    assert counts["chosen"]["first_sentence"] > 0 and counts["chosen"]["recaption"] > 0
    assert sum(counts["chosen"].values()) + counts["empty"] == 24
    # every fifth sidecar row failed: its recaption and first sentence fall back to the original, counted
    assert any(k.endswith("->original") for k in counts["fallbacks"])
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["mix_counts"] == counts and "first_sentence" in summary["truncated"]


def test_the_first_sentence_rule_is_part_of_the_cache_fingerprint():
    from t2i_recap.caption_specs import DERIVED_VERSIONS
    from t2i_recap.data import DataConfig

    plain = DataConfig(shards="x").caption_fingerprint()
    derived = DataConfig(shards="x", captions={"first_sentence": "first_sentence:recaption"}).caption_fingerprint()
    assert "derived_versions" not in plain  # a two-caption config keeps its fingerprint
    assert derived["derived_versions"] == {"first_sentence": DERIVED_VERSIONS["first_sentence"]}
    both = DataConfig(shards="x", captions={"first_sentence": "first_sentence:recaption",
                                            "placeless": "no_positions:first_sentence",
                                            "short": "short:recaption", "lead": "lead:recaption",
                                            "listing": "listing:recaption",
                                            "things": "first_things:recaption"}).caption_fingerprint()
    assert both["derived_versions"] == {k: DERIVED_VERSIONS[k] for k in ("first_sentence", "no_positions", "short",
                                                                         "lead", "listing", "first_things")}
