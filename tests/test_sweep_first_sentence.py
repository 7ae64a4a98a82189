"""The demo's first-sentence run: one more p = 0 DiT trained on the recaption and its first sentence
(data.captions `first_sentence:recaption`, mixing.weights), with its row in the demo's table."""

from __future__ import annotations

import json

import pytest

from t2i_recap import demo
from t2i_recap.config import from_dict, load_config


def _demo(tmp_path, **kw):
    return demo.Demo(from_dict(demo.DemoConfig, kw), tmp_path)


def test_first_sentence_run_joins_the_demo_and_the_default_stays_as_it_was(tmp_path):
    plain = {s.name: s for s in _demo(tmp_path).stages()}
    d = _demo(tmp_path, first_sentence_weight=0.3)
    stages = {s.name: s for s in d.stages()}
    assert d.first_sentence_name() == "p0_00_first0_30"
    assert set(stages) - set(plain) == {"prepare_first_sentence", "train_p0_00_first0_30", "eval_p0_00_first0_30"}
    assert stages["train_p0_00_first0_30"].depends == ("prepare_first_sentence",)
    assert "eval_p0_00_first0_30" in stages["compare"].depends
    for name in plain:  # every other stage keeps its settings, so a finished demo is not redone
        if name != "compare":
            assert stages[name].settings == plain[name].settings, name
    with pytest.raises(ValueError, match="first_sentence_weight"):
        from_dict(demo.DemoConfig, {"first_sentence_weight": 0.0})


def test_first_sentence_config_names_the_derived_caption_and_its_weight(tmp_path):
    from t2i_recap.train_config import TrainConfig

    d = _demo(tmp_path, first_sentence_weight=0.25)
    d.train_config()
    cfg = load_config(TrainConfig, d.first_sentence_config(), ["mixing.p=0.0"])  # as the demo's train call sets it
    assert cfg.data.captions == {"first_sentence": "first_sentence:recaption"}
    assert cfg.mixing.weights == {"recaption": 0.75, "first_sentence": 0.25}
    assert cfg.features.cache_dir == str(tmp_path / "features_first_sentence")
    base = load_config(TrainConfig, tmp_path / "train_base.yaml")
    assert cfg.data.shards == base.data.shards and cfg.trainer.max_steps == base.trainer.max_steps


@pytest.mark.parametrize("kind,tag", [("short", "short"), ("no_positions", "nopos"), ("lead", "lead"), ("listing", "list"), ("first_things", "things")])
def test_short_caption_joins_the_first_sentence_run_in_files_of_its_own(tmp_path, kind, tag):
    from t2i_recap.train_config import TrainConfig

    plain = {s.name: s for s in _demo(tmp_path, first_sentence_weight=0.1).stages()}
    d = _demo(tmp_path, first_sentence_weight=0.1, short_caption_weight=0.3, short_caption=kind)
    stages = {s.name: s for s in d.stages()}
    name = f"p0_00_first0_10_{tag}0_30"
    assert d.first_sentence_name() == name
    assert set(stages) - set(plain) == {f"prepare_{name}", f"train_{name}", f"eval_{name}"}
    assert stages[f"train_{name}"].depends == (f"prepare_{name}",)
    d.train_config()
    path = d.first_sentence_config()
    assert path == tmp_path / f"train_{name}.yaml"
    cfg = load_config(TrainConfig, path, ["mixing.p=0.0"])
    assert cfg.data.captions == {"first_sentence": "first_sentence:recaption", kind: f"{kind}:recaption"}
    assert cfg.mixing.weights == pytest.approx({"recaption": 0.6, "first_sentence": 0.1, kind: 0.3})
    assert cfg.features.cache_dir == str(tmp_path / f"features_{name}")


def test_short_caption_settings_are_checked():
    with pytest.raises(ValueError, match="set first_sentence_weight too"):
        from_dict(demo.DemoConfig, {"short_caption_weight": 0.3})
    with pytest.raises(ValueError, match="short_caption_weight must be"):
        from_dict(demo.DemoConfig, {"first_sentence_weight": 0.8, "short_caption_weight": 0.3})
    with pytest.raises(ValueError, match="short_caption must be one of short, no_positions, lead, listing, first_things"):
        from_dict(demo.DemoConfig, {"first_sentence_weight": 0.2, "short_caption_weight": 0.3,
                                    "short_caption": "first_sentence"})


@pytest.mark.slow
def test_quick_demo_with_a_first_sentence_run(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick", "--set", "first_sentence_weight=0.5"]) == 0
    summary = json.loads((out / "runs" / "p0_00_first0_50" / "summary.json").read_text())
    chosen = summary["mix_counts"]["chosen"]
    assert chosen.get("original", 0) == 0 and chosen["first_sentence"] > 0 and chosen["recaption"] > 0
    compare = json.loads((out / "report" / "compare.json").read_text())
    assert [r["label"] for r in compare["rows"]] == ["p=1", "p=0", "p=0 + first sentence 0.5"]
