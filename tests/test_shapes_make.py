"""`t2i-recap shapes make`: img2dataset layout, determinism, resume, readers."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_shapes import SHAPES_SHARDS_NUM
from t2i_recap.cli import main as cli_main
from t2i_recap.shapes.make import make_dataset, make_sample
from t2i_recap.shapes.oracle import read_scene
from t2i_recap.shapes.parser import parse_caption
from t2i_recap.shapes.world import Scene
from t2i_recap.shards import iter_tar_samples


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _samples(folder):
    return [s for tar in sorted(folder.glob("*.tar")) for s in iter_tar_samples(tar)]


def test_layout_keys_and_metadata(shapes_shards):
    assert sorted(p.name for p in shapes_shards.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    samples = _samples(shapes_shards)
    assert [s.key for s in samples] == [f"{shard:05d}{i:04d}" for shard in (0, 1) for i in range(32)]
    curated = 0
    for s in samples:
        assert s.error is None and set(s.files) == {"png", "txt", "json"}
        meta = json.loads(s.files["json"])
        assert meta["key"] == s.key and meta["caption"] == s.files["txt"].decode()
        assert meta["status"] == "success" and meta["error_message"] is None
        assert meta["width"] == meta["height"] == meta["original_width"] == 32
        assert meta["url"].startswith("shapes://train/0/")
        assert meta["sha256"] == hashlib.sha256(s.files["png"]).hexdigest()
        scene = Scene.from_dict(meta["scene"])
        assert read_scene(Image.open(io.BytesIO(s.files["png"]))) == scene
        if meta["curated"]:
            curated += 1
            assert parse_caption(meta["gold_caption"]).scene == scene
        else:
            assert meta["gold_caption"] is None
    assert curated == SHAPES_SHARDS_NUM // 4


def test_parquet_and_stats_match_the_tars(shapes_shards):
    for shard in ("00000", "00001"):
        table = pq.read_table(shapes_shards / f"{shard}.parquet").to_pylist()
        with tarfile.open(shapes_shards / f"{shard}.tar") as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        assert len(table) == len(metas) == 32
        for row, meta in zip(table, metas):
            assert row | {"scene": json.loads(row["scene"])} == meta
        stats = json.loads((shapes_shards / f"{shard}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == 32 and stats["status_dict"] == {"success": 32}
        assert stats["args"]["seed"] == 0


def test_tar_members_are_deterministic_and_plain(shapes_shards):
    with tarfile.open(shapes_shards / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.png", "000000000.txt", "000000000.json"]
    assert all(m.isfile() and m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(curated_fraction=0.3, shard_size=16, progress=False)
    make_dataset(tmp_path / "a", 40, seed=5, **kw)
    make_dataset(tmp_path / "b", 40, seed=5, **kw)
    make_dataset(tmp_path / "c", 40, seed=6, **kw)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert len(_digests(tmp_path / "a")) == 9
    assert _digests(tmp_path / "a")["00000.tar"] != _digests(tmp_path / "c")["00000.tar"]


def test_content_does_not_depend_on_sharding_or_workers(tmp_path):
    make_dataset(tmp_path / "small", 24, seed=1, shard_size=5, progress=False)
    make_dataset(tmp_path / "big", 24, seed=1, shard_size=24, workers=2, progress=False)

    def by_url(folder):
        out = {}
        for s in _samples(folder):
            meta = json.loads(s.files["json"])
            out[meta["url"]] = (meta["caption"], meta["scene"], meta["sha256"], meta["curated"])
        return out

    assert by_url(tmp_path / "small") == by_url(tmp_path / "big")
    assert make_sample(3, seed=1) == make_sample(3, seed=1)
    assert make_sample(3, seed=1, split="val") != make_sample(3, seed=1)


def test_rerun_skips_finished_shards_and_redoes_missing_ones(tmp_path):
    out = tmp_path / "ds"
    first = make_dataset(out, 30, seed=2, shard_size=10, progress=False)
    assert first["written_shards"] == 3
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    digests = _digests(out)
    again = make_dataset(out, 30, seed=2, shard_size=10, progress=False)
    assert again["skipped_shards"] == 3 and again["written_shards"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "00001_stats.json").unlink()  # as if the run died before finishing shard 1
    (out / "00001.tar").write_bytes(b"partial")
    third = make_dataset(out, 30, seed=2, shard_size=10, progress=False)
    assert third["written_shards"] == 1
    assert _digests(out) == digests
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_growing_a_dataset_rewrites_only_its_short_last_shard(tmp_path):
    make_dataset(tmp_path / "grown", 15, seed=3, shard_size=10, progress=False)
    summary = make_dataset(tmp_path / "grown", 25, seed=3, shard_size=10, progress=False)
    assert summary["written_shards"] == 2 and summary["skipped_shards"] == 1
    make_dataset(tmp_path / "fresh", 25, seed=3, shard_size=10, progress=False)
    assert _digests(tmp_path / "grown") == _digests(tmp_path / "fresh")


def test_rerun_with_other_arguments_is_refused(tmp_path):
    make_dataset(tmp_path, 10, seed=0, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="resolution: 32 there, 48 now"):
        make_dataset(tmp_path, 10, seed=0, shard_size=10, resolution=48, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"shard_size": 20000}, "shard_size"), ({"curated_fraction": 1.5}, "curated_fraction"),
    ({"image_format": "gif"}, "image_format"), ({"split": "../x"}, "split"), ({"num": 0}, "num"),
])
def test_bad_arguments_name_themselves(tmp_path, kwargs, message):
    args = {"num": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_dataset(tmp_path, progress=False, **args)


def test_cli_jpg_and_split(tmp_path, capsys):
    rc = cli_main(["shapes", "make", "--out", str(tmp_path), "--num", "12", "--seed", "4", "--split", "val",
                   "--image-format", "jpg", "--resolution", "48", "--no-progress"])
    assert rc == 0 and "wrote 12 samples" in capsys.readouterr().out
    samples = _samples(tmp_path)
    assert len(samples) == 12 and set(samples[0].files) == {"jpg", "txt", "json"}
    hits = 0
    for s in samples:
        meta = json.loads(s.files["json"])
        assert meta["url"].startswith("shapes://val/4/") and meta["width"] == 48
        hits += read_scene(Image.open(io.BytesIO(s.files["jpg"]))) == Scene.from_dict(meta["scene"])
    assert hits >= 11
    with pytest.raises(SystemExit):
        cli_main(["shapes", "make", "--out", str(tmp_path / "x"), "--num", "3", "--shard-size", "0"])


def test_readable_by_webdataset(shapes_shards):
    import webdataset as wds

    urls = [str(p) for p in sorted(shapes_shards.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == SHAPES_SHARDS_NUM
    first = samples[0]
    assert first["__key__"] == "000000000" and first["png"].size == (32, 32)
    assert first["json"]["caption"] == first["txt"]


def test_readable_by_hf_datasets(shapes_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    files = [str(p) for p in sorted(shapes_shards.glob("*.tar"))]
    ds = datasets.load_dataset("webdataset", data_files=files, split="train", cache_dir=str(tmp_path))
    assert len(ds) == SHAPES_SHARDS_NUM
    row = ds[3]
    assert row["__key__"] == "000000003" and row["png"].size == (32, 32)
    assert row["json"]["curated"] is True and row["json"]["gold_caption"]
    table = datasets.load_dataset("parquet", data_files=str(shapes_shards / "00000.parquet"), split="train",
                                  cache_dir=str(tmp_path))
    assert table["key"][:2] == ["000000000", "000000001"]


def test_several_gold_wordings_per_curated_sample_change_nothing_else(tmp_path):
    one = make_dataset(tmp_path / "one", 40, curated_fraction=0.25, progress=False)
    five = make_dataset(tmp_path / "five", 40, curated_fraction=0.25, gold_captions=5, progress=False)
    assert one["curated"] == five["curated"] == 10
    for a, b in zip(_samples(tmp_path / "one"), _samples(tmp_path / "five")):
        assert a.files["png"] == b.files["png"] and a.files["txt"] == b.files["txt"]
        ma, mb = json.loads(a.files["json"]), json.loads(b.files["json"])
        assert ma["gold_caption"] == mb["gold_caption"]
        if not mb["curated"]:
            assert ma["gold_captions"] is mb["gold_captions"] is None
            continue
        assert ma["gold_captions"] == [ma["gold_caption"]]
        wordings = mb["gold_captions"]
        assert len(wordings) == 5 and wordings[0] == mb["gold_caption"] and len(set(wordings)) > 1
        scene = Scene.from_dict(mb["scene"])
        assert all(parse_caption(w).scene == scene for w in wordings)  # other words, the same scene
    table = pq.read_table(tmp_path / "five" / "00000.parquet").to_pylist()
    assert sum(len(r["gold_captions"] or []) for r in table) == 50
    # shards made before the option existed record no gold_captions: read as the default (1)
    stats = tmp_path / "one" / "00000_stats.json"
    data = json.loads(stats.read_text())
    del data["args"]["gold_captions"]
    stats.write_text(json.dumps(data))
    assert make_dataset(tmp_path / "one", 40, curated_fraction=0.25, progress=False)["skipped_shards"] == 1
