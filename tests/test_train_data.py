"""Training data: caption field specs (sidecar, .txt, .json, HF columns), image loading, and the
deterministic, resumable, rank-split record stream."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_recap.config import ConfigError, from_dict
from t2i_recap.data import (DataConfig, HFDatasetSource, Skip, WebDatasetSource, load_image, make_loader,
                            rank_records)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tar(path, samples: dict[str, dict[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(color=(200, 10, 10), size=(40, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_recap_datacomp_download_layout_trains_as_is(tmp_path):
    # img2dataset --caption_col re_caption --save_additional_columns '["org_caption"]'
    _tar(tmp_path / "00000.tar", {
        "000000000": {"jpg": _jpeg(), "txt": b"A detailed recaption.", "json": json.dumps({"org_caption": "web alt"}).encode()},
        "000000001": {"jpg": b"not a jpeg", "txt": b"x", "json": b"{}"},
        "000000002": {"jpg": _jpeg(), "txt": b"  ", "json": json.dumps({"org_caption": None}).encode()},
        "000000003": {"txt": b"no image here"},
    })
    cfg = DataConfig(shards=str(tmp_path), original_caption="json:org_caption", recaption="txt", resolution=16)
    src = WebDatasetSource(cfg)
    out = [src.decode(r) for r in src.records(0)]
    assert out[0]["original"] == "web alt" and out[0]["recaption"] == "A detailed recaption."
    assert out[0]["pixels"].shape == (3, 16, 16)
    assert isinstance(out[1], Skip) and "decode" in out[1].reason
    assert isinstance(out[2], Skip) and "neither" in out[2].reason
    assert isinstance(out[3], Skip) and "no image" in out[3].reason


def test_sidecar_join_by_key_and_failed_rows(train_shards):
    shards, side = train_shards
    src = WebDatasetSource(DataConfig(shards=str(shards), recaption_dir=str(side), resolution=16))
    out = [src.decode(r) for r in src.records(0)]
    assert all(o["original"] for o in out)  # .txt web captions
    missing = [o["key"] for o in out if o["recaption"] is None]
    assert len(missing) == 2  # every 5th row of 12 has status "error"
    first = json.loads(next(iter(_members(shards / "00000.tar", "json"))))
    assert out[0]["recaption"] == first["gold_caption"]


def _members(path, ext):
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith("." + ext):
                yield tar.extractfile(m).read()


def test_missing_sidecar_and_bad_specs_are_named(tmp_path, train_shards):
    shards, _ = train_shards
    src = WebDatasetSource(DataConfig(shards=str(shards), recaption_dir=str(tmp_path), resolution=16))
    with pytest.raises(FileNotFoundError, match="00000.parquet"):
        next(src.records(0))
    with pytest.raises(ConfigError, match="data.recaption"):
        from_dict(DataConfig, {"recaption": "parquet:re_caption"}, "x.yaml")
    with pytest.raises(ValueError, match="recaption_dir"):
        WebDatasetSource(DataConfig(shards=str(shards)))


def test_load_image_converts_modes_and_centre_crops():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.allclose(load_image(rgba, 8), torch.ones(3, 8, 8))  # transparent -> white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(cmyk, 8)[0].mean() > 0.9
    wide = Image.new("RGB", (30, 10), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 10))  # white left third is cropped away
    assert load_image(wide, 10).max() < 0


def _keys(stream, n):
    return [(cur, rec.key) for cur, rec in (next(stream) for _ in range(n))]


def test_stream_resumes_at_its_cursor_and_splits_ranks(train_shards):
    shards, _ = train_shards
    src = WebDatasetSource(DataConfig(shards=str(shards), recaption="json:gold_caption", resolution=16))
    full = _keys(rank_records(src, seed=1, rank=0, world=1, buffer=5), 40)  # crosses into epoch 1
    assert len({k for _, k in full[:24]}) == 24  # an epoch is a permutation
    assert [k for _, k in full[:16]] != [k for _, k in full[24:40]]  # reshuffled next epoch
    cursor = full[29][0]
    resumed = _keys(rank_records(src, seed=1, rank=0, world=1, buffer=5, start=tuple(cursor)), 10)
    assert resumed == full[30:40]
    for world in (2, 3):  # by shard (2 shards, 2 ranks) and by sample (3 ranks > 2 shards)
        parts = [[k for _, k in _keys(rank_records(src, seed=1, rank=r, world=world, buffer=5), 24 // world)]
                 for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(k for _, k in full[:24])


def test_batches_do_not_depend_on_worker_count(train_shards):
    shards, _ = train_shards
    src = WebDatasetSource(DataConfig(shards=str(shards), recaption="json:gold_caption", resolution=16))
    kw = dict(batch_size=5, seed=3, rank=0, world=1, buffer=4)
    one = make_loader(src, num_workers=0, **kw)
    two = make_loader(src, num_workers=2, **kw)
    a = [b for _, b in zip(range(6), one)]
    b = [b for _, b in zip(range(6), two)]
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert [x["cursor"] for x in a] == [x["cursor"] for x in b] and a[-1]["cursor"] == [1, 6]
    assert torch.equal(a[3]["pixels"], b[3]["pixels"])


def test_hf_dataset_source(tmp_path):
    import datasets

    imgs = [Image.fromarray(np.full((12, 12, 3), i * 20, np.uint8)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"image": imgs, "alt": ["a", "b", None, "d", "e"],
                                     "recap": ["A.", None, "C.", "D.", "E."]})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = from_dict(DataConfig, {"hf_dataset": str(tmp_path / "ds"), "original_caption": "column:alt",
                                 "recaption": "column:recap", "resolution": 8, "hf_rows_per_shard": 2})
    src = HFDatasetSource(cfg)
    assert src.shards == ["hf-00000", "hf-00001", "hf-00002"]
    rows = [src.decode(r) for i in range(3) for r in src.records(i)]
    assert [r["original"] for r in rows] == ["a", "b", None, "d", "e"]
    assert rows[1]["recaption"] is None and rows[0]["pixels"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="column"):
        HFDatasetSource(DataConfig(hf_dataset=str(tmp_path / "ds"), original_caption="txt",
                                   recaption="column:recap"))
