"""`t2i-recap caption stats` on a hand-made sidecar: every number checked by hand."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from t2i_recap.captioner import stats
from t2i_recap.captioner.writer import Row, write_sidecar

LONG = " ".join(["a small red circle in the top left corner"] * 12)  # ~100 BPE tokens: over CLIP's 77


def _rows():
    return [
        Row("k0", org_caption="red circle", re_caption="a small red circle in the center", finish_reason="stop",
            repetition=False, re_num_tokens=8),
        Row("k1", org_caption="blue square icon", re_caption="a large blue square on the left", finish_reason="stop",
            repetition=False, re_num_tokens=8),
        Row("k2", org_caption="IMG_1234.jpg", re_caption=LONG, finish_reason="length", repetition=True,
            re_num_tokens=128),
        Row("k3", org_caption="shapes", status="skipped", error="zero-byte image file"),
    ]


def _meta(seconds, ok, source):
    return {"model": "tiny", "generation": {"max_new_tokens": 128}, "counts": {"ok": ok, "skipped": 1, "failed": 0,
            "seconds": seconds}, "images_per_second": ok / seconds, "shard": {"name": "00000", "source": source},
            "backend": {"device": "cpu"}, "world_size": 1}


@pytest.fixture
def sidecar_dir(tmp_path):
    images = tmp_path / "images.tar"
    with tarfile.open(images, "w") as tar:
        for i, color in enumerate(["red", "blue", "green", "white"]):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), color).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", b"x")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_sidecar(tmp_path / "sc" / "00000.parquet", _rows(), _meta(2.0, 3, str(images)))
    # img2dataset's own metadata parquet beside the sidecars: not ours, left out
    pq.write_table(pa.table({"key": ["k0"], "caption": ["x"]}), tmp_path / "sc" / "00000_meta.parquet")
    return tmp_path / "sc"


def test_caption_numbers_by_hand(sidecar_dir):
    side = stats.read_sidecars(sidecar_dir)
    s = stats.caption_stats(side.rows, max_new_tokens=128)
    assert s["rows"] == 4 and s["status"] == {"ok": 3, "skipped": 1}
    assert s["words"]["original"]["mean"] == pytest.approx((2 + 3 + 1 + 1) / 4)
    assert s["words"]["recaption"]["count"] == 3
    assert s["words"]["recaption"]["mean"] == pytest.approx((7 + 7 + 108) / 3, abs=1e-3)
    assert s["hit_token_cap"] == {"count": 1, "of": 3, "share": 0.3333}
    assert s["repetition"]["count"] == 1
    v = s["vocabulary"]
    # original words: red circle blue square icon img 1234 jpg shapes (9)
    # recaption words: a small red circle in the center large blue square on left top corner (14)
    assert (v["original"], v["recaption"]) == (9, 14)
    assert v["shared"] == 4  # red circle blue square
    assert v["jaccard"] == round(4 / 19, 4)
    assert len(side.files) == 1  # the non-sidecar parquet is left out
    assert s["errors"] == {"zero-byte image file": 1}


def test_token_lengths_and_throughput(sidecar_dir, shapes_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shapes_tokenizer_dir))
    side = stats.read_sidecars(sidecar_dir)
    s = stats.caption_stats(side.rows, tok)
    assert s["tokens"]["original"]["count"] == 4
    assert s["tokens"]["recaption"]["max"] == len(tok(LONG)["input_ids"]) > 77
    t = stats.throughput(side.infos)
    assert t["captioned"] == 3 and t["images_per_second_per_process"] == 1.5 and t["devices"] == ["cpu"]


def test_cli_writes_json_markdown_and_histogram_with_clip_score(sidecar_dir, captioner_clip_dir, tmp_path):
    out = tmp_path / "stats"
    assert stats.main(["--sidecars", str(sidecar_dir), "--clip", str(captioner_clip_dir), "--out", str(out)]) == 0
    data = json.loads((out / "stats.json").read_text())
    clip = data["clip_score"]
    assert clip["pairs"] == 3 and clip["max_tokens"] == 77 and clip["pairs_uncut"] == 2
    assert clip["recaption"]["cut_to_max_tokens"]["count"] == 1 and clip["original"]["cut_to_max_tokens"]["count"] == 0
    for side in ("original", "recaption"):
        assert isinstance(clip[side]["score"], float) and isinstance(clip[side]["score_uncut_pairs"], float)
    assert data["captions"]["tokens"]["tokenizer"]
    md = (out / "stats.md").read_text()
    assert "cut to 77 CLIP tokens" in md and "1.5 images/s" in md
    png = (out / "lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] > 500


def test_no_sidecars_is_a_clear_error(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="00000.parquet: not a readable parquet"):
        stats.read_sidecars(tmp_path)
    (tmp_path / "00000.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no recaption sidecars"):
        stats.read_sidecars(tmp_path)
