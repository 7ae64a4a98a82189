"""data.sources: several shard sets mixed per sample by weight; the mixed stream resumes exactly at
its cursor, a run over sources resumes exactly, and the feature cache keeps the mixture."""

from __future__ import annotations

import math

import pytest

from fixtures_train import train_config_dict, write_shards
from t2i_recap.config import ConfigError, from_dict
from t2i_recap.data import DataConfig, build_source
from t2i_recap.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def second_set(tmp_path_factory):
    """Another shard set: 12 other shapes in 2 shards of 6, with sidecars."""
    root = tmp_path_factory.mktemp("second_set")
    write_shards(root / "shards", num=12, shard_size=6, seed=1, sidecar_dir=root / "sidecars")
    return root / "shards", root / "sidecars"


def _sources(train_shards, second_set, wa=3.0, wb=1.0) -> list[dict]:
    (a, a_side), (b, b_side) = train_shards, second_set
    return [{"name": "web", "shards": str(a), "recaption_dir": str(a_side), "weight": wa},
            {"name": "extra", "shards": str(b), "recaption_dir": str(b_side), "weight": wb}]


def _data(train_shards, second_set, **kw) -> DataConfig:
    return from_dict(DataConfig, {"sources": _sources(train_shards, second_set, **kw), "resolution": 16,
                                  "original_caption": "txt", "recaption": "sidecar:re_caption"})


def test_mixture_frequencies_follow_the_weights(train_shards, second_set):
    src = build_source(_data(train_shards, second_set))
    assert src.shards == ["web.00000", "web.00001", "extra.00000", "extra.00001"]
    n = 3000
    stream = src.mixed_records(seed=0, rank=0, world=1, buffer=8)
    picks = [next(stream)[1].shard.split(".")[0] for _ in range(n)]
    web = picks.count("web")
    assert abs(web - 0.75 * n) <= 5 * math.sqrt(n * 0.75 * 0.25), web
    # the 12-sample source is drawn a quarter of the time: it cycles through ~62 epochs of its own
    assert picks.count("extra") > 5 * 12


def test_mixed_stream_resumes_exactly_at_its_cursor(train_shards, second_set):
    src = build_source(_data(train_shards, second_set, wa=1.0, wb=1.0))
    kw = dict(seed=4, rank=0, world=1, buffer=8)
    stream = src.mixed_records(**kw)
    first = [next(stream) for _ in range(80)]  # crosses epochs of both sources
    cursor = first[29][0]
    assert len(cursor) == 5 and cursor[0] == 30
    again = src.mixed_records(**kw, start=cursor)
    assert [(c, r.shard, r.key) for c, r in (next(again) for _ in range(50))] == \
        [(c, r.shard, r.key) for c, r in first[30:]]
    # within an epoch of a source, two ranks draw from their own halves of it
    def first_epoch(rank):
        out = set()
        for _, (c, r) in zip(range(40), src.mixed_records(seed=4, rank=rank, world=2, buffer=8)):
            j = 0 if r.shard.startswith("web.") else 1
            if c[1 + 2 * j] == 0:
                out.add((r.shard, r.key))
        return out

    r0, r1 = first_epoch(0), first_epoch(1)
    assert len(r0) >= 10 and len(r1) >= 10 and not r0 & r1


def test_sources_config_errors(train_shards, second_set):
    bad = _sources(train_shards, second_set)
    bad[1]["captions"] = {"short": "first_sentence:recaption"}
    with pytest.raises(ConfigError, match="same caption names|caption names of the data section"):
        from_dict(DataConfig, {"sources": bad})
    with pytest.raises(ConfigError, match="not both"):
        from_dict(DataConfig, {"sources": _sources(train_shards, second_set), "shards": str(train_shards[0])})
    same = _sources(train_shards, second_set)
    same[1]["name"] = "web"
    with pytest.raises(ConfigError, match="unique"):
        from_dict(DataConfig, {"sources": same})
    with pytest.raises(ConfigError, match="weight"):
        from_dict(DataConfig, {"sources": [{**same[0], "weight": 0}]})


def test_run_over_sources_resumes_exactly_and_cache_keeps_the_mixture(tmp_path, train_assets, train_shards, second_set):
    from t2i_recap.trainer import train
    from test_train_loop import _assert_close, _tensors

    def cfg(run, steps, **features):
        raw = train_config_dict(train_assets, train_shards[0], tmp_path / run, train_shards[1],
                                trainer={"max_steps": steps}, checkpoint={"every_steps": 3, "keep": 3},
                                mixing={"p": 0.2}, features=features)
        raw["data"] = {**raw["data"], "shards": None, "recaption_dir": None,
                       "sources": _sources(train_shards, second_set, wa=1.0, wb=1.0)}
        return from_dict(TrainConfig, raw)

    straight = train(cfg("straight", 6))
    train(cfg("resumed", 3))
    resumed = train(cfg("resumed", 6), resume="latest")
    for name in ("model", "ema", "optimizer"):
        _assert_close(_tensors(tmp_path / "straight", 6, name), _tensors(tmp_path / "resumed", 6, name))
    assert straight["mix_counts"] == resumed["mix_counts"]
    import json

    state = json.loads((tmp_path / "resumed/checkpoints/step-00000006/state.json").read_text())
    assert len(state["ranks"][0]["cursor"]) == 5 and state["ranks"][0]["cursor"][0] == 24  # 24 draws
    cached = train(cfg("cached", 6, cache_dir=str(tmp_path / "cache")))
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.*.safetensors")) == [
        "extra.00000.safetensors", "extra.00001.safetensors", "web.00000.safetensors", "web.00001.safetensors"]
    assert cached["mix_counts"] == straight["mix_counts"]
    _assert_close(_tensors(tmp_path / "straight", 6, "model"), _tensors(tmp_path / "cached", 6, "model"), atol=1e-5)
