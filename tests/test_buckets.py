"""Aspect-ratio buckets (data.aspect_buckets) on real photographs of four shapes, downloaded by
img2dataset over 127.0.0.1: the bin table, each photo's bin (EXIF orientation applied), one bin per
micro-batch with every sample once per epoch, exact resume, the feature cache, and the trainer."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from fixtures_real import BUCKET_ASPECTS, bucket_photos, shard_by_name
from fixtures_train import train_config_dict
from t2i_recap.buckets import BucketBatcher, bucket_table, header_size, nearest_bucket
from t2i_recap.config import from_dict
from t2i_recap.data import BatchStream, DataConfig, build_source, make_loader
from t2i_recap.train_config import TrainConfig

RES, UNIT, BATCH = 16, 4, 2  # the tiny VAE downsamples 2x and DiT-tiny/2 has patch 2: 4 px per token side
N = 23  # samples in the bucket_shards fixture (tests/fixtures_real.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def _aspect(name: str) -> str:
    return name.removesuffix(".jpg").split("_", 1)[1]  # "chelsea_four_three.jpg" -> "four_three"


def _ratio(size) -> float:
    h, w = size
    return h / w


# ---------------------------------------------------------------- the table


def test_the_table_is_pixarts_scaled_to_the_resolution_and_the_patch():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN, ASPECT_RATIO_256_BIN

    # at PixArt's own sizes (8x VAE x patch 2 = 16 px) the table is diffusers' own
    assert set(bucket_table(1024, 16)) == {(int(h), int(w)) for h, w in ASPECT_RATIO_1024_BIN.values()}
    assert set(bucket_table(256, 16)) == {(int(h), int(w)) for h, w in ASPECT_RATIO_256_BIN.values()}
    for resolution, multiple in ((256, 16), (512, 32), (320, 16), (RES, UNIT)):
        table = bucket_table(resolution, multiple)
        assert (resolution, resolution) in table
        assert all(h % multiple == 0 and w % multiple == 0 for h, w in table)
        assert [_ratio(s) for s in table] == sorted(_ratio(s) for s in table)
        assert len(set(table)) == len(table)
        # about resolution^2 pixels each, aspect ratios 1:4 to 4:1 where the patch allows
        assert all(abs(math.log(h * w / resolution ** 2)) < 1.0 for h, w in table), (resolution, table)
    assert _ratio(bucket_table(256, 16)[0]) == 0.25 and _ratio(bucket_table(256, 16)[-1]) == 4.0
    with pytest.raises(ValueError, match="data.resolution=30 must be a multiple of the latent patch"):
        bucket_table(30, 4)


def test_each_real_photo_goes_to_the_bin_of_its_upright_shape():
    table = bucket_table(RES, UNIT)
    photos = bucket_photos()
    assert len(photos) == N
    for name, data in photos.items():
        aspect = _aspect(name)
        w, h = header_size(data)
        want_w, want_h = BUCKET_ASPECTS[aspect]
        assert w * want_h == h * want_w, (name, w, h)  # EXIF-rotated portraits read upright
        bh, bw = table[nearest_bucket(w, h, table)]
        nearest = min(abs(math.log(_ratio(s) * w / h)) for s in table)
        assert abs(math.log(bh / bw * w / h)) == pytest.approx(nearest), name
    assert header_size(b"not an image") is None
    with pytest.raises(ValueError, match="no aspect ratio"):
        nearest_bucket(0, 5, table)


def test_batcher_groups_by_bin_and_counts_the_remainder():
    stream = [((0, i + 1), b) for i, b in enumerate([0, 1, 0, 2, 1, 0, None])] + [((1, 1), 0), ((1, 2), 0)]
    out = list(BucketBatcher(iter(stream), lambda b: b, 2))
    assert out == [(0, 0, [((0, 1), 0), ((0, 3), 0)]), (0, 1, [((0, 2), 1), ((0, 5), 1)]), (0, None, [((0, 7), None)]),
                   ("remainder", 0, 2), (1, 0, [((1, 1), 0), ((1, 2), 0)])]


# ---------------------------------------------------------------- the stream


def _source(bucket_shards):
    cfg = DataConfig(shards=str(bucket_shards), resolution=RES, shuffle_buffer=8, original_caption="json:org_caption",
                     recaption="txt", aspect_buckets=True)
    src = build_source(cfg)
    src.buckets = bucket_table(RES, UNIT)
    return src


def _take(stream, n: int) -> list[dict]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def test_every_micro_batch_holds_one_bin_and_every_sample_trains_once_an_epoch(bucket_shards):
    src = _source(bucket_shards)
    names = {key: name for name, (key, _) in shard_by_name(bucket_shards).items()}
    assert len(names) == N
    batches = _take(BatchStream(src, batch_size=BATCH, seed=3, rank=0, world=1, buffer=8, bucketed=True), 24)
    for b in batches:
        h, w = map(int, b["bucket"].split("x"))
        assert b["pixels"].shape == (BATCH, 3, h, w) and (h, w) in src.buckets
        aspects = {_aspect(names[k]) for k in b["key"]}
        assert len(aspects) == 1, (b["bucket"], aspects)  # one shape per micro-batch
        assert float(b["pixels"].min()) >= -1 and float(b["pixels"].max()) <= 1
    epoch0 = [k for b in batches if b["cursor"][0] == 0 for k in b["key"]]
    first_of_1 = next(b for b in batches if b["cursor"][0] == 1)
    assert len(epoch0) == len(set(epoch0))  # no sample twice in an epoch
    # the 4:3 bin holds 5 photos: one waits at the epoch's end, counted, not trained
    assert N - len(epoch0) == first_of_1["bucket_remainder"] == 1
    sizes = Counter(b["bucket"] for b in batches if b["cursor"][0] == 0)
    by_aspect = {_aspect(names[b["key"][0]]): b["bucket"] for b in batches}
    assert len(sizes) == 4 and sizes[by_aspect["four_three"]] == 2
    hw = {a: tuple(map(int, s.split("x"))) for a, s in by_aspect.items()}
    assert hw["square"] == (RES, RES) and _ratio(hw["wide"]) < 0.75 and _ratio(hw["tall"]) > 1.5
    assert 0.7 < _ratio(hw["four_three"]) < 0.8  # height / width of a 4:3 landscape


def test_a_resumed_stream_gives_the_same_batches_across_an_epoch_boundary(bucket_shards):
    src = _source(bucket_shards)
    kw = dict(batch_size=BATCH, seed=5, rank=0, world=1, buffer=8, bucketed=True)
    straight = _take(BatchStream(src, **kw), 16)
    cut = 9  # epoch 0 has 11 micro-batches: the resumed stream crosses into epoch 1
    assert straight[cut]["cursor"][0] == 0 and straight[-1]["cursor"][0] == 1
    resumed = _take(BatchStream(_source(bucket_shards), start=tuple(straight[cut]["cursor"]), **kw), 16 - cut - 1)
    for a, b in zip(straight[cut + 1:], resumed):
        assert a["key"] == b["key"] and a["cursor"] == b["cursor"] and a["bucket"] == b["bucket"]
        assert a["bucket_remainder"] == b["bucket_remainder"] and torch.equal(a["pixels"], b["pixels"])
    # DataLoader workers take whole micro-batches in turn: the same order with 2 workers
    loader = make_loader(_source(bucket_shards), num_workers=2, **{k: v for k, v in kw.items()})
    workers = []
    for batch in loader:
        workers.append(batch["key"])
        if len(workers) == 12:
            break
    assert workers == [b["key"] for b in straight[:12]]


def test_a_stream_without_a_table_is_refused(bucket_shards):
    src = build_source(DataConfig(shards=str(bucket_shards), resolution=RES, original_caption="json:org_caption",
                                  recaption="txt"))
    with pytest.raises(ValueError, match="needs a source with aspect buckets"):
        BatchStream(src, batch_size=2, seed=0, rank=0, world=1, buffer=8, bucketed=True)
    with pytest.raises(ValueError, match="bucket_window must be >= 1"):
        from_dict(DataConfig, {"sources": [{"name": "web", "shards": str(bucket_shards), "weight": 1.0}],
                               "original_caption": "json:org_caption", "recaption": "txt", "aspect_buckets": True,
                               "bucket_window": 0})


# ---------------------------------------------------------------- buckets over data.sources


@pytest.fixture(scope="module")
def second_photos(tmp_path_factory):
    """Another img2dataset shard (over 127.0.0.1): only the wide and tall cuts of the photos (12)."""
    from fixtures_real import img2dataset_shards

    root = tmp_path_factory.mktemp("second_photos")
    files = {n: b for n, b in bucket_photos().items() if _aspect(n) in ("wide", "tall")}
    return img2dataset_shards(files, root / "shards", "jpg", root / "work")


def _sources(bucket_shards, second_photos) -> list[dict]:
    return [{"name": "photos", "shards": str(bucket_shards), "weight": 2.0},
            {"name": "more", "shards": str(second_photos), "weight": 1.0}]


def _mixed(bucket_shards, second_photos):
    src = build_source(from_dict(DataConfig, {"sources": _sources(bucket_shards, second_photos), "resolution": RES,
                                              "shuffle_buffer": 8, "original_caption": "json:org_caption",
                                              "recaption": "txt", "aspect_buckets": True}))
    src.buckets = bucket_table(RES, UNIT)
    return src


def test_a_bucketed_mixture_fills_its_bins_in_windows_and_resumes_exactly(bucket_shards, second_photos):
    window = 10
    kw = dict(batch_size=BATCH, seed=2, rank=0, world=1, buffer=8, bucketed=True, window=window)
    straight = _take(BatchStream(_mixed(bucket_shards, second_photos), **kw), 40)
    for b in straight:
        h, w = map(int, b["bucket"].split("x"))
        assert b["pixels"].shape == (BATCH, 3, h, w)
        photos = [c.removeprefix("org caption of ") for c in b["original"]]  # keys repeat across sources
        assert len({_aspect(n) for n in photos}) == 1  # one bin per micro-batch, across sources
        assert len(b["cursor"]) == 2 + 2 * 2 and b["cursor"][0] % window == 0  # (window's start, count)
    # every window's draws are trained or counted as left in a bin that did not fill a micro-batch
    starts = sorted({b["cursor"][0] for b in straight})
    for w in starts[:-1]:
        trained = sum(len(b["key"]) for b in straight if b["cursor"][0] == w)
        nxt = next(b for b in straight if b["cursor"][0] > w)
        assert nxt["cursor"][0] == w + window and trained + nxt["bucket_remainder"] == window, w
    assert any(b["bucket_remainder"] for b in straight)
    # resumed at a batch's cursor (mid-window and at a window's last batch): the same batches follow
    last_of_window = max(i for i, b in enumerate(straight) if b["cursor"][0] == starts[2])
    for cut in (5, last_of_window):
        resumed = _take(BatchStream(_mixed(bucket_shards, second_photos), start=tuple(straight[cut]["cursor"]), **kw),
                        len(straight) - cut - 1)
        for a, b in zip(straight[cut + 1:], resumed):
            assert (a["key"], a["cursor"], a["bucket"], a["bucket_remainder"]) == \
                (b["key"], b["cursor"], b["bucket"], b["bucket_remainder"])
            assert torch.equal(a["pixels"], b["pixels"])


def test_training_on_a_bucketed_mixture_resumes_exactly_and_a_cache_trains_the_same(tmp_path, train_assets,
                                                                                     bucket_shards, second_photos):
    from test_train_loop import _assert_close, _tensors

    from t2i_recap import prepare
    from t2i_recap.config import to_dict
    from t2i_recap.trainer import train
    from fixtures_train import write_config

    def cfg(run, **sections):
        d = train_config_dict(train_assets, bucket_shards, tmp_path / run, **sections)
        d["data"] = {k: v for k, v in d["data"].items() if k not in ("shards", "recaption_dir")}
        d["data"].update(sources=_sources(bucket_shards, second_photos), original_caption="json:org_caption",
                         recaption="txt", aspect_buckets=True, bucket_window=12)
        return from_dict(TrainConfig, d)

    common = dict(mixing={"p": 0.5}, trainer={"max_steps": 8}, checkpoint={"every_steps": 4, "keep": 3})
    summary = train(cfg("straight", **common))
    counts = summary["mix_counts"]
    assert summary["step"] == 8 and sum(counts["buckets"].values()) == 8 * 4 and len(counts["buckets"]) > 1
    train(cfg("resumed", **{**common, "trainer": {"max_steps": 4}}))
    again = train(cfg("resumed", **common), resume="latest")
    assert again["mix_counts"] == counts and counts["bucket_remainder"] > 0  # 12-draw windows leave some
    for name in ("model", "ema", "optimizer"):
        _assert_close(_tensors(tmp_path / "straight", 8, name), _tensors(tmp_path / "resumed", 8, name))

    cached_cfg = cfg("cached", **common, features={"cache_dir": str(tmp_path / "cache")})
    assert prepare.main(["--config", str(write_config(tmp_path / "c.yaml", to_dict(cached_cfg)))]) == 0
    from safetensors import safe_open

    for name in ("photos.00000", "more.00000"):  # one file per source shard, latents at each bin's size
        with safe_open(str(tmp_path / "cache" / f"{name}.safetensors"), "pt") as f:
            assert len({k for k in f.keys() if k.startswith("mean@")}) == (4 if name.startswith("photos") else 2)
    cached = train(cached_cfg)
    assert cached["mix_counts"] == counts
    _assert_close(_tensors(tmp_path / "straight", 8, "model"), _tensors(tmp_path / "cached", 8, "model"), atol=1e-5)


# ---------------------------------------------------------------- the trainer


def _cfg(train_assets, bucket_shards, run_dir, **sections) -> TrainConfig:
    d = train_config_dict(train_assets, bucket_shards, run_dir, **sections)
    d["data"].update(original_caption="json:org_caption", recaption="txt", aspect_buckets=True)
    return from_dict(TrainConfig, d)


def test_training_on_buckets_resumes_exactly_and_a_cache_trains_the_same(tmp_path, train_assets, bucket_shards):
    from test_train_loop import _assert_close, _tensors

    from t2i_recap import prepare
    from t2i_recap.config import to_dict
    from t2i_recap.trainer import train
    from fixtures_train import write_config

    common = dict(mixing={"p": 0.5}, trainer={"max_steps": 8}, checkpoint={"every_steps": 4, "keep": 3},
                  validation={"every_steps": 8, "height": 16, "width": 32})
    summary = train(_cfg(train_assets, bucket_shards, tmp_path / "straight", **common))
    assert summary["step"] == 8
    counts = summary["mix_counts"]["buckets"]
    assert len(counts) == 4 and sum(counts.values()) == 8 * 4
    from PIL import Image

    grid = Image.open(tmp_path / "straight/samples/step-00000008.png")
    assert grid.size == (32, 16)  # one prompt, one seed at validation.height x width

    half = {**common, "trainer": {"max_steps": 4}}
    train(_cfg(train_assets, bucket_shards, tmp_path / "resumed", **half))
    again = train(_cfg(train_assets, bucket_shards, tmp_path / "resumed", **common), resume="latest")
    assert again["mix_counts"] == summary["mix_counts"]  # 32 samples = one epoch + 10: the remainder counted
    assert summary["mix_counts"]["bucket_remainder"] == 1
    for name in ("model", "ema", "optimizer"):
        _assert_close(_tensors(tmp_path / "straight", 8, name), _tensors(tmp_path / "resumed", 8, name))

    # the feature cache stores each bin's latents at its size and trains the same micro-batches
    cached_cfg = _cfg(train_assets, bucket_shards, tmp_path / "cached", **common,
                      features={"cache_dir": str(tmp_path / "cache")})
    assert prepare.main(["--config", str(write_config(tmp_path / "c.yaml", to_dict(cached_cfg)))]) == 0
    from safetensors import safe_open

    cache_file = tmp_path / "cache" / "00000.safetensors"
    with safe_open(str(cache_file), "pt") as f:
        meta, names = f.metadata(), set(f.keys())
        mean_sizes = {n.split("@")[1]: f.get_slice(n).get_shape() for n in names if n.startswith("mean@")}
        keys = json.loads(meta["keys"])
    from t2i_recap.shards import iter_tar_samples

    assert keys == [raw.key for raw in iter_tar_samples(bucket_shards / "00000.tar")]  # rows in shard order
    assert sum(s[0] for s in mean_sizes.values()) == N and len(mean_sizes) == 4
    for size, shape in mean_sizes.items():
        h, w = map(int, size.split("x"))
        assert shape[1:] == [4, h // 2, w // 2]  # latents at the bin's size (2x VAE)
    cached = train(cached_cfg)
    assert cached["mix_counts"] == summary["mix_counts"]
    _assert_close(_tensors(tmp_path / "straight", 8, "model"), _tensors(tmp_path / "cached", 8, "model"), atol=1e-5)

    # the export lists the bins and plain diffusers generates at one of them
    from diffusers import DiffusionPipeline

    from t2i_recap.export import export

    out = export(tmp_path / "straight", tmp_path / "export")
    settings = json.loads((out / "t2i_recap.json").read_text())
    assert settings["aspect_buckets"] is True and settings["buckets"] == [list(b) for b in bucket_table(RES, UNIT)]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    image = pipe("a photo", height=8, width=32, num_inference_steps=2, use_resolution_binning=False,
                 max_sequence_length=settings["max_sequence_length"]).images[0]
    assert image.size == (32, 8) and [8, 32] in settings["buckets"]


def test_the_validation_loss_scores_each_held_out_photo_at_its_own_bin(tmp_path, train_assets, bucket_shards):
    import shutil

    from t2i_recap.trainer import Trainer

    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(bucket_shards / "00000.tar", held / "held-00000.tar")  # another shard id: kept out of training
    vloss = {"loss_every_steps": 0, "loss_shards": str(held), "loss_batches": 3, "loss_batch_size": 4,
             "loss_timesteps": 2}
    trainer = Trainer(_cfg(train_assets, bucket_shards, tmp_path / "run", trainer={"max_steps": 1}, validation=vloss))
    table = bucket_table(RES, UNIT)
    src = _source(bucket_shards)
    first = [table[src.bucket_of(rec)] for _, rec in zip(range(12), src.records(0))]
    batches = trainer.val_loss.batches
    assert trainer.val_loss.samples == 12  # the first 3 x 4 held-out photos, in shard order
    assert len(batches) > 3  # batched bin by bin
    assert all(len(b["mean"]) <= 4 for b in batches)
    seen = Counter()
    for b in batches:
        h, w = b["mean"].shape[-2] * 2, b["mean"].shape[-1] * 2  # the tiny VAE downsamples 2x
        seen[(h, w)] += len(b["mean"])
    assert seen == Counter(first) and len(seen) > 1  # every photo at its own bin, not the square
    out = trainer.validation_loss()
    assert {"val_loss", "val_loss/original", "val_loss/recaption"} <= set(out)
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    assert trainer.validation_loss() == out  # fixed timesteps and noise at every size

    square = train_config_dict(train_assets, bucket_shards, tmp_path / "sq", trainer={"max_steps": 1}, validation=vloss)
    square["data"].update(original_caption="json:org_caption", recaption="txt")  # no aspect_buckets
    square = Trainer(from_dict(TrainConfig, square))
    assert [tuple(b["mean"].shape[-2:]) for b in square.val_loss.batches] == [(RES // 2, RES // 2)] * 3


def test_the_hf_datasets_route_puts_each_sample_in_the_same_bin(bucket_shards):
    from t2i_recap.data import HFDatasetSource

    web = _source(bucket_shards)
    hf = HFDatasetSource(DataConfig(hf_dataset="webdataset", hf_data_files=[str(bucket_shards / "00000.tar")],
                                    resolution=RES, original_caption="json:org_caption", recaption="txt",
                                    aspect_buckets=True))
    hf.buckets = web.buckets
    assert hf._header_view() is not hf.ds  # sizes from the encoded bytes, not a second decode
    web_bins = {rec.key: web.bucket_of(rec) for rec in web.records(0)}
    hf_bins = {}
    for rec in hf.records(0):
        hf_bins[rec.key] = b = hf.bucket_of(rec)
        ex = hf.decode(rec, hf.buckets[b])
        assert tuple(ex["pixels"].shape[1:]) == hf.buckets[b]
    assert len(hf_bins) == N and sorted(hf_bins.values()) == sorted(web_bins.values())
    assert len(set(hf_bins.values())) == 4
