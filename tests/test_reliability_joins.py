"""Verified joins: a sidecar belongs to the shard it was made from; no sample trains on a caption
it did not get; one bad sample or one empty shard never passes unnoticed or stops the run."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_reliability_identity import EchoBackend, caption, fake_model, png, simple_samples, write_tar


def _source(shards, sidecars, **kw):
    from t2i_recap.data import DataConfig, WebDatasetSource

    cfg = DataConfig(**{"shards": str(shards), "recaption_dir": str(sidecars), "resolution": 8,
                        "original_caption": "txt", "recaption": "sidecar:re_caption", **kw})
    return WebDatasetSource(cfg)


def _decoded(src, index: int) -> list:
    return [src.decode(r) for r in src.records(index)]


@pytest.fixture
def download(tmp_path):
    """Two shards captioned by `caption run` (stand-in backend) into their sidecars."""
    shards = tmp_path / "shards"
    for i in range(2):
        write_tar(shards / f"{i:05d}.tar", simple_samples(4, tag=f"k{i}"))
    model = fake_model(tmp_path / "model")
    assert caption(shards, tmp_path / "recaps", model)["shards_done"] == 2
    return shards, tmp_path / "recaps", model


# ----------------------------------------------------------------------------- which sidecar


def test_captioned_sidecars_join_and_every_sample_gets_its_recaption(download):
    shards, recaps, _ = download
    out = _decoded(_source(shards, recaps), 1)
    assert [o["key"] for o in out] == [f"k1{i:03d}" for i in range(4)]
    assert all(o["recaption"] == "a red square" for o in out)


def test_sidecar_from_another_download_is_refused_naming_both(download, tmp_path):
    from t2i_recap.sidecar_join import SidecarMismatchError

    shards, recaps, _ = download
    other = tmp_path / "other_download"
    write_tar(other / "00000.tar", simple_samples(4, tag="k0", color="blue"))  # same names, other images
    with pytest.raises(SidecarMismatchError) as err:
        next(_source(other, recaps).records(0))
    assert str(recaps / "00000.parquet") in str(err.value) and str(other / "00000.tar") in str(err.value)
    assert str(shards / "00000.tar") in str(err.value)  # the shard the sidecar was made from


def test_shard_rewritten_after_captioning_is_refused_by_the_trainer(download):
    from t2i_recap.sidecar_join import SidecarMismatchError

    shards, recaps, _ = download
    write_tar(shards / "00001.tar", simple_samples(4, tag="k1", color="green"))
    src = _source(shards, recaps)
    assert len(_decoded(src, 0)) == 4  # the unchanged shard still joins
    with pytest.raises(SidecarMismatchError, match="older version"):
        next(src.records(1))


def test_same_shards_moved_elsewhere_still_join(download, tmp_path):
    shards, recaps, _ = download
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved, copy_function=shutil.copy)
    assert all(o["recaption"] for o in _decoded(_source(moved, recaps), 0))


# ----------------------------------------------------------------------------- coverage


def _hand_sidecar(path: Path, keys: list[str], status: str = "success") -> None:
    """A sidecar made by another tool: rows only, no provenance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"key": k, "re_caption": f"recaption of {k}", "status": status} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_sidecar_whose_keys_match_nothing_stops_training(tmp_path):
    from t2i_recap.sidecar_join import RecaptionCoverageError

    write_tar(tmp_path / "shards" / "00000.tar", simple_samples(200))
    _hand_sidecar(tmp_path / "side" / "00000.parquet", [f"other{i}" for i in range(200)])
    src = _source(tmp_path / "shards", tmp_path / "side")
    records = src.records(0)
    with pytest.raises(RecaptionCoverageError, match="no row in recaption sidecar") as err:
        for _ in range(200):
            next(records)
    assert "00000.tar" in str(err.value) and "00000.parquet" in str(err.value)
    assert "3 of 3" in str(err.value)  # stopped after 1% of the shard, not at its end


@pytest.mark.parametrize("threshold, stops", [(0.99, True), (0.9, True), (0.8, False)])
def test_coverage_below_the_threshold_stops(tmp_path, threshold, stops):
    from t2i_recap.sidecar_join import RecaptionCoverageError

    write_tar(tmp_path / "shards" / "00000.tar", simple_samples(10))
    _hand_sidecar(tmp_path / "side" / "00000.parquet", [f"s{i:03d}" for i in range(2, 10)])  # 8 of 10
    src = _source(tmp_path / "shards", tmp_path / "side", min_recaption_coverage=threshold)
    if stops:
        with pytest.raises(RecaptionCoverageError, match="have no row in recaption sidecar"):
            _decoded(src, 0)
    else:
        out = _decoded(src, 0)
        assert [o["recaption"] is None for o in out] == [True, True] + [False] * 8


def test_min_recaption_coverage_is_checked():
    from t2i_recap.data import DataConfig

    assert DataConfig().min_recaption_coverage == 0.99
    with pytest.raises(ValueError, match="min_recaption_coverage"):
        DataConfig(min_recaption_coverage=1.5)


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_keys_the_captioned_row_wins_and_the_refused_duplicate_is_not_trained(tmp_path):
    from t2i_recap.data import Skip

    shards = tmp_path / "shards"
    path = shards / "00000.tar"
    samples = {"a": {"png": png("red"), "txt": b"first a"}, "b": {"png": png(), "txt": b"b"}}
    write_tar(path, samples)
    write_tar(tmp_path / "dup.tar", {"a": {"png": png("blue"), "txt": b"second a"}})


    with tarfile.open(path, "a") as tar, tarfile.open(tmp_path / "dup.tar") as dup:
        for m in dup:
            tar.addfile(m, dup.extractfile(m))
    out = tmp_path / "recaps"
    assert caption(shards, out, fake_model(tmp_path / "model"))["shards_done"] == 1
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("a", "skipped")]
    got = _decoded(_source(shards, out), 0)
    assert got[0]["key"] == "a" and got[0]["original"] == "first a" and got[0]["recaption"] == "a red square"
    assert isinstance(got[2], Skip) and "duplicate key" in got[2].reason


def test_index_rows_prefers_the_captioned_row_in_any_order():
    from t2i_recap.sidecar_join import index_rows

    skipped = {"key": "a", "status": "skipped", "re_caption": None}
    ok = {"key": "a", "status": "ok", "re_caption": "yes"}
    assert index_rows([skipped, ok])["a"] is ok and index_rows([ok, skipped])["a"] is ok


# ----------------------------------------------------------------------------- names with dots


def test_dotted_shard_names_get_distinct_sidecars_and_cache_files_and_train_once(tmp_path, train_assets):
    from t2i_recap import cache
    from t2i_recap.data import rank_records
    from t2i_recap.text_encoders import TextEncoderConfig

    shards = tmp_path / "shards"
    for i in range(2):
        write_tar(shards / f"web.{i:05d}.tar", simple_samples(3, tag=f"w{i}"))
    recaps = tmp_path / "recaps"
    assert caption(shards, recaps, fake_model(tmp_path / "model"))["shards_done"] == 2
    assert sorted(p.name for p in recaps.glob("*.parquet")) == ["web.00000.parquet", "web.00001.parquet"]

    src = _source(shards, recaps)
    assert src.shards == ["web.00000", "web.00001"]
    stream = rank_records(src, seed=0, rank=0, world=1, buffer=4)
    epoch = [next(stream)[1] for _ in range(6)]
    assert sorted((r.shard, r.key) for r in epoch) == sorted(
        (f"web.{i:05d}", f"w{i}{j:03d}") for i in range(2) for j in range(3))  # each sample once

    enc = cache.FeatureEncoder(cache.FeaturesConfig(vae=str(train_assets / "vae"), dtype="float32"),
                               TextEncoderConfig(name_or_path=str(train_assets / "clip")))
    src8 = _source(shards, recaps, resolution=16)
    summary = cache.prepare_cache(enc, src8, src8.cfg, tmp_path / "cache")
    assert summary["built"] == 2 and summary["rows"] == 6
    cached = cache.CacheSource(tmp_path / "cache", src8.shards, cache.fingerprint_hash(enc.fingerprint(src8.cfg)))
    assert [cached.keys(i) for i in range(2)] == [[f"w{i}{j:03d}" for j in range(3)] for i in range(2)]


def test_two_shards_with_one_id_are_refused(tmp_path):
    from t2i_recap.data import DataConfig, WebDatasetSource

    write_tar(tmp_path / "a.tar", simple_samples(1))
    write_tar(tmp_path / "a.tar.gz", simple_samples(1))
    with pytest.raises(ValueError, match="same shard id 'a'"):
        WebDatasetSource(DataConfig(shards=str(tmp_path / "a.{tar,tar.gz}"), original_caption="txt",
                                    recaption="txt"))


# ----------------------------------------------------------------------------- one sample never stops a run


def _json_shard(path: Path, tag: str, member: bytes) -> None:
    write_tar(path, {f"{tag}0": {"png": png(), "json": member}, f"{tag}1": {"png": png(), "txt": b"fine"}})


@pytest.mark.parametrize("member, note", [
    (b'{"caption": "caf\\ud800 sign"}', "lone surrogate"),  # JSON escapes a lone surrogate; no UTF-8 form
    (b'["a", "list"]', None),
    (b'"just a string"', None),
])
def test_bad_json_sample_does_not_stop_the_run_and_later_shards_are_done(tmp_path, member, note):
    shards = tmp_path / "shards"
    _json_shard(shards / "00000.tar", "a", member)
    write_tar(shards / "00001.tar", simple_samples(2, tag="b"))
    model = fake_model(tmp_path / "model")
    for _ in range(2):  # and on the rerun
        summary = caption(shards, tmp_path / "recaps", model)
        assert not summary["shards_failed"]
    assert sorted(p.name for p in (tmp_path / "recaps").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    row = pq.read_table(tmp_path / "recaps" / "00000.parquet").to_pylist()[0]
    if note:
        assert note in row["notes"] and "\ufffd" in row["org_caption"]


@pytest.mark.parametrize("member, reason", [
    (b'["a", "list"]', "json member is a list"),
    (b'"just a string"', "json member is a str"),
    (b'{"caption": 3}', None),  # not a string: no caption from it (the sample has its .txt too)
])
def test_training_skips_json_of_the_wrong_type_with_its_reason(tmp_path, member, reason):
    from t2i_recap.data import DataConfig, Skip, WebDatasetSource

    write_tar(tmp_path / "00000.tar", {"a": {"png": png(), "json": member, "txt": b"alt"},
                                       "b": {"png": png(), "json": b'{"caption": "ok"}', "txt": b"alt"}})
    src = WebDatasetSource(DataConfig(shards=str(tmp_path), resolution=8, original_caption="txt",
                                      recaption="json:caption"))
    out = _decoded(src, 0)
    if reason:
        assert isinstance(out[0], Skip) and reason in out[0].reason
    else:
        assert out[0]["recaption"] is None and out[0]["original"] == "alt"
    assert out[1]["recaption"] == "ok"
    # a shard whose captions come from .txt only trains on the same sample: its json is not read
    txt_only = WebDatasetSource(DataConfig(shards=str(tmp_path), resolution=8, original_caption="txt", recaption="txt"))
    assert not isinstance(txt_only.decode(next(txt_only.records(0))), Skip)


def test_lone_surrogate_in_a_training_caption_is_replaced(tmp_path):
    from t2i_recap.data import DataConfig, WebDatasetSource

    write_tar(tmp_path / "00000.tar", {"a": {"png": png(), "json": b'{"caption": "caf\\ud800 sign"}', "txt": b"x"}})
    src = WebDatasetSource(DataConfig(shards=str(tmp_path), resolution=8, original_caption="txt",
                                      recaption="json:caption"))
    text = _decoded(src, 0)[0]["recaption"]
    assert text == "caf\ufffd sign" and text.encode("utf-8")


# ----------------------------------------------------------------------------- empty shards


def test_shard_where_every_sample_was_skipped_is_reported(tmp_path, tiny_llava_dir):
    from t2i_recap.captioner import run

    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", {"bad0": {"png": b"", "txt": b"x"}, "bad1": {"png": b"<html>", "txt": b"y"}})
    write_tar(shards / "00001.tar", simple_samples(2, tag="g", color="white"))
    args = ["--input", str(shards), "--out", str(tmp_path / "recaps"), "--model", str(tiny_llava_dir),
            "--batch-size", "4", "--max-new-tokens", "8"]
    assert run.main(args) == 1
    assert (tmp_path / "recaps" / "00001.parquet").exists() and (tmp_path / "recaps" / "00000.parquet").exists()
    assert run.main(args) == 1  # the rerun still says so: the shard is done, and empty
    assert run.main(args + ["--allow-empty-shards"]) == 0
    result = caption(shards, tmp_path / "recaps", tiny_llava_dir, EchoBackend())
    assert result["shards_empty"] == ["00000"]


def test_reader_error_names_the_shard_and_the_last_key_and_later_shards_are_done(tmp_path, monkeypatch):
    from t2i_recap.captioner import readers

    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", simple_samples(3, tag="a"))
    write_tar(shards / "00001.tar", simple_samples(2, tag="b"))
    real = readers._tar_samples

    def breaks_after_one(path, cfg):
        for n, sample in enumerate(real(path, cfg)):
            if path.name == "00000.tar" and n == 1:
                raise ValueError("reader gave up")
            yield sample

    monkeypatch.setattr(readers, "_tar_samples", breaks_after_one)
    summary = caption(shards, tmp_path / "recaps", fake_model(tmp_path / "model"), prefetch_batches=0)
    assert summary["shards_failed"] == [{"shard": "00000", "after_key": "a000", "error": "ValueError: reader gave up"}]
    assert summary["shards_done"] == 1 and (tmp_path / "recaps" / "00001.parquet").exists()


def test_train_cli_stops_with_one_line_on_a_sidecar_of_another_download(tmp_path, train_assets, capsys):
    from fixtures_train import train_config_dict, write_config

    from t2i_recap import train

    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", simple_samples(8))
    _hand_sidecar(tmp_path / "side" / "00000.parquet", [f"x{i}" for i in range(8)])
    cfg = train_config_dict(train_assets, shards, tmp_path / "run", tmp_path / "side", trainer={"max_steps": 1})
    assert train.main(["--config", str(write_config(tmp_path / "t.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "no row in recaption sidecar" in err and "00000.tar" in err and "Traceback" not in err


def test_member_name_that_is_not_utf8_is_skipped_and_the_shard_written(tmp_path):
    shards = tmp_path / "shards"
    path = write_tar(shards / "00000.tar", simple_samples(1, tag="good"))
    with tarfile.open(path, "a", encoding="utf-8", errors="surrogateescape") as tar:
        data = png()
        info = tarfile.TarInfo("bad\udcff.png")  # the bytes b"bad\xff.png" in the archive
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    summary = caption(shards, tmp_path / "recaps", fake_model(tmp_path / "model"))
    assert summary["shards_done"] == 1 and not summary["shards_failed"]
    rows = pq.read_table(tmp_path / "recaps" / "00000.parquet").to_pylist()
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "skipped" and "unsafe sample key" in rows[1]["error"]
    assert "lone surrogate" in rows[1]["notes"]
