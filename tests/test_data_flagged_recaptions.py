"""data.flagged_recaptions: recaptions the captioner flagged (cut at the token cap, repetitive) are
kept, dropped or fall back to the other captions, and counted in the run summary."""

from __future__ import annotations

import json

import pytest

from captioner.writer import Row, write_sidecar
from fixtures_train import train_config_dict
from t2i_recap.config import from_dict
from t2i_recap.data import FLAGGED, DataConfig, Skip, WebDatasetSource
from t2i_recap.shards import iter_tar_samples
from t2i_recap.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flagged_sidecars(train_shards, tmp_path_factory):
    """Captioner sidecars for the shapes shards: sample i cut at the cap if i % 4 == 1, repetitive if i % 4 == 2."""
    shards, _ = train_shards
    out = tmp_path_factory.mktemp("flagged")
    flags = {}
    for tar in sorted(shards.glob("*.tar")):
        rows = []
        for i, raw in enumerate(iter_tar_samples(tar)):
            meta = json.loads(raw.files["json"])
            length, rep = i % 4 == 1, i % 4 == 2
            rows.append(Row(raw.key, org_caption=meta["caption"], re_caption=meta["gold_caption"],
                            finish_reason="length" if length else "stop", repetition=rep, re_num_tokens=20))
            flags[raw.key] = length or rep
        write_sidecar(out / f"{tar.stem}.parquet", rows, {"model": "fixture"})
    return shards, out, flags


def _decoded(shards, side, policy):
    src = WebDatasetSource(DataConfig(shards=str(shards), recaption_dir=str(side), resolution=16,
                                      flagged_recaptions=policy, captions={"first": "first_sentence:recaption"}))
    return [src.decode(r) for i in range(len(src.shards)) for r in src.records(i)]


def test_keep_drop_fallback(flagged_sidecars):
    shards, side, flags = flagged_sidecars
    kept = _decoded(shards, side, None)
    assert all(not isinstance(o, Skip) and o["recaption"] for o in kept)
    assert [bool(o["flagged_recaption"]) for o in kept] == [flags[o["key"]] for o in kept]
    assert _decoded(shards, side, "keep")[0]["recaption"] == kept[0]["recaption"]
    dropped = _decoded(shards, side, "drop")
    skips = [o for o in dropped if isinstance(o, Skip)]
    assert {s.key for s in skips} == {k for k, f in flags.items() if f}
    assert all(s.reason.startswith(FLAGGED) for s in skips)
    assert any("finish_reason=length" in s.reason for s in skips) and any("repetition" in s.reason for s in skips)
    fallback = _decoded(shards, side, "fallback")
    for o in fallback:
        assert not isinstance(o, Skip)
        if flags[o["key"]]:  # the recaption and what is derived from it read as missing; the original stays
            assert o["recaption"] is None and o["first"] is None and o["original"]
        else:
            assert o["recaption"] and o["first"]
    with pytest.raises(ValueError, match="keep, drop or fallback"):
        DataConfig(shards="x", flagged_recaptions="ignore")


def test_drop_and_fallback_change_the_cache_fingerprint():
    base = DataConfig(shards="x")
    assert base.caption_fingerprint() == DataConfig(shards="x", flagged_recaptions="keep").caption_fingerprint()
    assert base.caption_fingerprint() != DataConfig(shards="x", flagged_recaptions="fallback").caption_fingerprint()
    assert base.caption_fingerprint() != DataConfig(shards="x", flagged_recaptions="drop").caption_fingerprint()


@pytest.mark.parametrize("policy", ["keep", "drop", "fallback"])
def test_flagged_recaptions_are_counted_in_the_summary(policy, flagged_sidecars, train_assets, tmp_path):
    from t2i_recap.trainer import train

    shards, side, flags = flagged_sidecars
    cfg = train_config_dict(train_assets, shards, tmp_path / "run", side, data={"flagged_recaptions": policy},
                            trainer={"max_steps": 6}, mixing={"p": 0.0, "cfg_dropout": 0.0})
    counts = train(from_dict(TrainConfig, cfg))["mix_counts"]  # 24 samples drawn = one epoch
    n_flagged = sum(flags.values())
    if policy == "drop":
        assert counts["dropped_flagged"] >= n_flagged - 4 and counts["flagged_recaptions"] == 0  # a batch left out
        assert counts["dropped_flagged"] <= n_flagged + 12  # the run walks at most 1.5 epochs
    else:
        assert counts["dropped_flagged"] == 0 and counts["flagged_recaptions"] == n_flagged
    fallbacks = counts["fallbacks"].get("recaption->original", 0)
    assert fallbacks == (n_flagged if policy == "fallback" else 0)  # p = 0: every flagged sample fell back
