"""The released Recap-DataComp-1B captions (parquet with the released column names) joined to shards
written by the real img2dataset over 127.0.0.1, by sha256 or url, with the coverage enforced."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest

from fixtures_real import serve
from t2i_recap.data import DataConfig, Skip, WebDatasetSource
from t2i_recap.released import ReleasedCoverageError

RELEASED_COLUMNS = ["url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score",
                    "re_length", "org_length", "re_caption_condition_diverse_topk"]


def _jpeg(color, size=(48, 32)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).ellipse((8, 4, 30, 26), fill=(255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """(shards folder, released parquet, {url: released row}, changed url): img2dataset downloads 6 images;
    one of them was replaced on the site after the release, so its sha256 no longer matches."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset import download as img2dataset_download

    root = tmp_path_factory.mktemp("released")
    site = root / "site"
    site.mkdir()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 60, 160)]
    released_bytes = {f"img{i}.jpg": _jpeg(c) for i, c in enumerate(colors)}
    for name, data in released_bytes.items():
        (site / name).write_bytes(data)
    (site / "img5.jpg").write_bytes(_jpeg((10, 10, 10)))  # replaced after the release
    server, base = serve(site)
    try:
        rows = []
        for i, (name, data) in enumerate(sorted(released_bytes.items())):
            re_caption = f"The image shows a solid background with a round shape, number {i}. It is centred."
            rows.append({"url": f"{base}/{name}", "re_caption": re_caption, "org_caption": f"stock photo {i}",
                         "sha256": hashlib.sha256(data).hexdigest(), "key": f"{i:09d}", "re_clip_score": 0.31,
                         "org_clip_score": 0.27, "re_length": len(re_caption.split()), "org_length": 3,
                         "re_caption_condition_diverse_topk": f"A round shape on a plain background ({i})."})
        rows.append({**rows[0], "url": f"{base}/never_downloaded.jpg", "sha256": "0" * 64, "key": "000000099"})
        table = pa.Table.from_pylist(rows).select(RELEASED_COLUMNS)
        (root / "release").mkdir()
        pq.write_table(table, root / "release" / "part-00000.parquet")
        # the user's own download: the release's url list through img2dataset (compute_hash sha256 by default)
        urls = root / "urls.parquet"
        pd.DataFrame({"url": [r["url"] for r in rows[:6]]}).to_parquet(urls)
        img2dataset_download(url_list=str(urls), input_format="parquet", url_col="url", output_format="webdataset",
                             output_folder=str(root / "shards"), processes_count=1, thread_count=2, resize_mode="no",
                             skip_reencode=True, number_sample_per_shard=6, timeout=10, retries=1,
                             enable_wandb=False, distributor="multiprocessing")
    finally:
        server.shutdown()
    return root / "shards", root / "release" / "*.parquet", {r["url"]: r for r in rows}, f"{base}/img5.jpg"


def _cfg(download, **kw) -> DataConfig:
    shards, release, _, _ = download
    return DataConfig(shards=str(shards), released_captions=str(release), original_caption="released:org_caption",
                      recaption="released:re_caption", resolution=16,
                      captions={"diverse": "released:re_caption_condition_diverse_topk"}, **kw)


def _decoded(src):
    return [src.decode(r) for r in src.records(0)]


def test_img2dataset_writes_url_and_sha256(download):
    import tarfile

    shards, _, rows, _ = download
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 6 and all(m["url"] in rows and len(m["sha256"]) == 64 for m in metas)


def test_join_by_url_matches_every_sample(download, caplog):
    _, _, rows, _ = download
    src = WebDatasetSource(_cfg(download, join_on="url", min_recaption_coverage=1.0))
    with caplog.at_level(logging.INFO, logger="t2i_recap.released"):
        out = _decoded(src)
    assert "6 of 6 samples of shard 00000 matched by url" in caplog.text
    import tarfile

    shards = download[0]
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        url_of = {m.name.split(".")[0]: json.load(tar.extractfile(m))["url"] for m in tar.getmembers()
                  if m.name.endswith(".json")}
    for o in out:
        row = rows[url_of[o["key"]]]
        assert (o["original"], o["recaption"], o["diverse"]) == (
            row["org_caption"], row["re_caption"], row["re_caption_condition_diverse_topk"])


def test_join_by_sha256_refuses_a_changed_image_and_enforces_coverage(download, caplog):
    src = WebDatasetSource(_cfg(download, min_recaption_coverage=0.8))
    with caplog.at_level(logging.INFO, logger="t2i_recap.released"):
        out = _decoded(src)
    assert "5 of 6 samples of shard 00000 matched by sha256" in caplog.text
    skipped = [o for o in out if isinstance(o, Skip)]
    assert len(skipped) == 1 and "none of the captions" in skipped[0].reason  # the replaced image has none
    strict = WebDatasetSource(_cfg(download, min_recaption_coverage=0.9))
    with pytest.raises(ReleasedCoverageError, match=r"only 5 of 6 samples .* by sha256 .*min_recaption_coverage=0.9"):
        _decoded(strict)


def test_released_config_errors(download, tmp_path):
    shards, release, _, _ = download
    with pytest.raises(ValueError, match="released_captions is not set"):
        DataConfig(shards=str(shards), recaption="released:re_caption")
    with pytest.raises(ValueError, match="no caption reads it"):
        DataConfig(shards=str(shards), released_captions=str(release))
    with pytest.raises(FileNotFoundError, match="names no parquet"):
        WebDatasetSource(DataConfig(shards=str(shards), recaption="released:re_caption",
                                    released_captions=str(tmp_path / "none*.parquet")))
    with pytest.raises(ValueError, match=r"no column\(s\) \['re_caption_v9'\]"):
        WebDatasetSource(DataConfig(shards=str(shards), recaption="released:re_caption_v9",
                                    released_captions=str(release)))


def test_the_release_is_part_of_the_cache_fingerprint(download, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    shards, release, _, _ = download
    copy = tmp_path / "release"
    shutil.copytree(Path(str(release)).parent, copy)
    cfg = DataConfig(shards=str(shards), recaption="released:re_caption", released_captions=str(copy))
    before = cfg.caption_fingerprint()
    assert before["join_on"] == "sha256" and before["released"][0]["name"] == "part-00000.parquet"
    table = pq.read_table(copy / "part-00000.parquet")
    pq.write_table(table.slice(1), copy / "part-00000.parquet")  # a different release
    assert cfg.caption_fingerprint() != before


def test_caption_stats_reads_the_release_joined_to_the_download(download, tmp_path):
    from captioner import stats

    shards, release, rows, _ = download
    assert stats.main(["--released", str(release), "--images", str(shards), "--join-on", "url",
                       "--out", str(tmp_path / "by_url")]) == 0
    out = json.loads((tmp_path / "by_url" / "stats.json").read_text())
    assert out["released"] == {"files": ["part-00000.parquet"], "join_on": "url", "samples": 6, "matched": 6, "share": 1.0}
    assert out["captions"]["rows"] == 6 and out["captions"]["words"]["recaption"]["mean"] == 15
    assert stats.main(["--released", str(release), "--images", str(shards), "--min-coverage", "0.8",
                       "--out", str(tmp_path / "by_sha")]) == 0
    assert json.loads((tmp_path / "by_sha" / "stats.json").read_text())["released"]["matched"] == 5
    with pytest.raises(ReleasedCoverageError, match="only 5 of 6 samples"):
        stats.main(["--released", str(release), "--images", str(shards), "--out", str(tmp_path / "strict")])


def test_prepare_below_coverage_is_one_error_line(download, train_assets, tmp_path, capsys):
    from fixtures_train import train_config_dict, write_config
    from t2i_recap import prepare

    shards, release, _, _ = download
    raw = train_config_dict(train_assets, shards, tmp_path / "run", features={"cache_dir": str(tmp_path / "cache")})
    raw["data"] = {**raw["data"], "released_captions": str(release), "original_caption": "released:org_caption",
                   "recaption": "released:re_caption", "min_recaption_coverage": 0.9}
    assert prepare.main(["--config", str(write_config(tmp_path / "cfg.yaml", raw))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "released captions" in line]
    assert len(err) == 1 and "only 5 of 6 samples" in err[0]  # one line, no traceback


def test_captioner_sidecars_carry_the_downloads_url_and_sha256(download, tmp_path):
    """The sidecar rows keep img2dataset's url and sha256, so the release joins the recaptions too."""
    import tarfile

    import pyarrow.parquet as pq
    from test_reliability_bad_input import EchoBackend

    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    shards, _, rows, _ = download
    summary = caption_run(CaptionRunConfig(input=str(shards), out=str(tmp_path / "recaps"), model="echo"), Dist(),
                          EchoBackend())
    assert not summary["shards_failed"], summary
    side = pq.read_table(next((tmp_path / "recaps").glob("*.parquet"))).to_pylist()
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for row in side:
        meta = json.loads(members[f"{row['key']}.json"])
        assert (row["url"], row["sha256"]) == (meta["url"], meta["sha256"])
        assert row["sha256"] == hashlib.sha256(members[f"{row['key']}.jpg"]).hexdigest()  # the bytes' own hash
        assert row["url"] in rows
    assert len(side) == 6
