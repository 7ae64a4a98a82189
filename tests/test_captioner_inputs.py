"""Captioner inputs without a model: safe decoding, captions, prompts, readers, repetition, sidecars."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_captioner import HOSTILE_EXPECT, encode, hostile_images


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("name", list(hostile_images()))
def test_each_hostile_image_is_converted_or_rejected_with_reason(name):
    from t2i_recap.captioner.images import BadImage, decode_image

    ext, data = hostile_images()[name]
    status, reason = HOSTILE_EXPECT[name]
    if status == "skipped":
        with pytest.raises(BadImage, match=reason):
            decode_image(data)
        return
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    if reason:
        assert any(reason in n for n in decoded.notes), decoded.notes


def test_conversions_keep_the_content():
    from t2i_recap.captioner.images import decode_image

    images = hostile_images()
    assert decode_image(images["sixteenbit"][1]).image.getpixel((0, 0)) == (128, 128, 128)  # not clipped white
    palette = decode_image(images["palette"][1]).image
    assert palette.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert palette.getpixel((8, 8)) == (0, 0, 255)
    assert decode_image(images["animated"][1]).image.getpixel((0, 0)) == (255, 0, 0)  # first frame
    r, g, b = decode_image(images["cmyk"][1]).image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # C=0 M=255 Y=255 is red


def test_exif_orientation_is_applied():
    from t2i_recap.captioner.images import decode_image

    img = Image.new("RGB", (30, 10), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert decoded.image.size == (10, 30)


def test_pixel_limit_is_configurable():
    from t2i_recap.captioner.images import BadImage, decode_image

    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(data, max_pixels=5000)


# ---------------------------------------------------------------- captions and prompts


def test_caption_decoding():
    from t2i_recap.captioner.readers import decode_caption

    assert decode_caption(b"  hello\n") == ("hello", [])
    assert decode_caption(b"\xef\xbb\xbfbom") == ("bom", [])
    text, notes = decode_caption("caf\u00e9".encode("latin-1"))
    assert text == "caf\ufffd" and "not valid UTF-8" in notes[0]
    text, notes = decode_caption("x" * 50, max_chars=10)
    assert text == "x" * 10 and "cut from 50 to 10" in notes[0]
    assert decode_caption(None) == (None, [])
    assert decode_caption("   ") == (None, [])


def test_prompts():
    from t2i_recap.captioner.prompts import RECAP_PROMPT, build_prompt, build_prompt_with_notes

    assert RECAP_PROMPT == "Please generate a detailed caption of this image. Please be as descriptive as possible."
    assert build_prompt("recap", "a dog") == RECAP_PROMPT
    conditioned = build_prompt("conditioned", "a dog\non grass")
    assert conditioned.startswith(RECAP_PROMPT) and '"a dog on grass"' in conditioned
    assert build_prompt("conditioned", None) == RECAP_PROMPT
    assert build_prompt("custom", "a dog", template="Alt: {org_caption}. Describe.") == "Alt: a dog. Describe."
    assert build_prompt("custom", "a dog", template="Describe.") == "Describe."
    prompt, notes = build_prompt_with_notes("conditioned", "w " * 2000, max_hint_chars=20)
    assert "cut from" in notes[0] and len(prompt) < len(RECAP_PROMPT) + 200
    with pytest.raises(ValueError, match="needs a template"):
        build_prompt("custom", "x")
    with pytest.raises(ValueError, match="only \\{org_caption\\}"):
        build_prompt("custom", "x", template="{url}")
    with pytest.raises(ValueError, match="unknown prompt preset"):
        build_prompt("fancy", "x")


def test_repetition_detection():
    from t2i_recap.captioner.repetition import is_repetitive

    loop = "A red car parked on a street. " + "a red car, " * 20
    assert is_repetitive(loop, "length")
    assert not is_repetitive(loop, "stop")  # finished on its own: not a runaway loop
    varied = " ".join(f"word{i}" for i in range(60))
    assert not is_repetitive(varied, "length")
    assert is_repetitive("abcabcabcabcabcabc", "length")


# ---------------------------------------------------------------- readers


def test_webdataset_reader(captioner_shards):
    from t2i_recap.captioner.readers import detect_format, open_shards

    assert detect_format(str(captioner_shards)) == "webdataset"  # the img2dataset .parquet beside is ignored
    shards = open_shards(str(captioner_shards))
    assert [s.name for s in shards] == ["00000", "00001", "00002", "00003"]
    samples = list(shards[1].samples())
    assert len(samples) == 5 and all(s.error is None and s.image.mode == "RGB" for s in samples)
    assert all(s.shard == "00001" and s.org_caption for s in samples)
    pattern = str(captioner_shards / "{00001..00002}.tar")
    assert [s.name for s in open_shards(pattern)] == ["00001", "00002"]


def test_recap_datacomp_json_org_caption_wins(tmp_path):
    import tarfile

    from t2i_recap.captioner.readers import open_shards

    png = encode(Image.new("RGB", (8, 8)), "PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in [("000000000.png", png), ("000000000.txt", b"the recaption"),
                           ("000000000.json", json.dumps({"org_caption": "the alt text"}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = open_shards(str(tmp_path / "00000.tar"))[0].samples()
    assert sample.org_caption == "the alt text"


def test_parquet_reader_bytes_and_paths(tmp_path):
    from t2i_recap.captioner.readers import open_shards

    png = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png)
    pq.write_table(pa.table({"key": ["k0", "k1"], "image": [{"bytes": png, "path": None}, {"bytes": b"junk", "path": None}],
                             "caption": ["one", None]}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"image_path": ["img/a.png", "img/missing.png"], "text": ["x", "y"]}),
                   tmp_path / "paths.parquet")
    shards = {s.name: list(s.samples()) for s in open_shards(str(tmp_path / "*.parquet"))}
    a, b = shards["bytes"]
    assert (a.key, a.org_caption, a.error) == ("k0", "one", None) and a.image.getpixel((0, 0)) == (1, 2, 3)
    assert b.error.startswith("not a recognised image") and b.org_caption is None
    c, d = shards["paths"]
    assert c.key == "paths-000000" and c.error is None and c.org_caption == "x"
    assert "cannot read image file 'img/missing.png'" in d.error


def test_parquet_without_images_is_a_clear_error(tmp_path):
    from t2i_recap.captioner.readers import open_shards

    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}), tmp_path / "00000.parquet")
    with pytest.raises(ValueError, match="no image column"):
        list(open_shards(str(tmp_path))[0].samples())


def test_imagefolder_reader(tmp_path):
    from t2i_recap.captioner.readers import ReaderConfig, open_shards

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png", "unlisted.png"):
        (root / name).write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "sub/c.png", "caption": "third"},
            {"file_name": "../outside.png", "text": "no"}, {"file_name": "b.png"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    shards = open_shards(str(root), ReaderConfig(samples_per_shard=4))
    samples = [s for shard in shards for s in shard.samples()]
    assert len(shards) == 2 and len(samples) == 6
    by_key = {s.key: s for s in samples}
    assert by_key["a"].org_caption == "first" and by_key["sub_c"].org_caption == "third"
    assert by_key["b"].error is None and by_key["b"].org_caption is None
    assert "outside the image folder" in by_key["outside"].error
    assert "unusable" in [s for s in samples if s.key.startswith("metadata")][0].error
    assert "not listed" in by_key["unlisted"].notes[0]


def test_hf_dataset_reader(tmp_path):
    import datasets

    from t2i_recap.captioner.readers import ReaderConfig, open_shards

    imgs = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"image": imgs, "text": [f"c{i}" for i in range(5)]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    shards = open_shards(str(tmp_path / "saved"), ReaderConfig(format="hf", samples_per_shard=2))
    samples = [s for shard in shards for s in shard.samples()]
    assert [s.org_caption for s in samples] == [f"c{i}" for i in range(5)] and len(shards) == 3
    assert samples[3].image.getpixel((0, 0)) == (120, 0, 0) and samples[3].key == "saved-00001-000003"
    # by "name" through the streaming loader (a packaged builder reading local files here: no hub)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    streamed = open_shards("parquet", ReaderConfig(format="hf", hf_config=None, hf_split="train",
                                                   hf_data_files=str(tmp_path / "train.parquet")))
    assert [s.org_caption for shard in streamed for s in shard.samples()] == [f"c{i}" for i in range(5)]


def test_shard_assignment_is_stable_and_complete():
    from t2i_recap.captioner.run import Dist

    shards = list(range(11))
    parts = [Dist(rank=r, world=3).mine(shards) for r in range(3)]
    assert sorted(x for p in parts for x in p) == shards
    assert parts[1] == [1, 4, 7, 10]


# ---------------------------------------------------------------- sidecars


def test_sidecar_roundtrip_and_resume_checks(tmp_path):
    from t2i_recap.captioner.writer import (Row, SidecarMismatch, is_finished, read_info, remove_stale_temps,
                                            write_sidecar)

    path = tmp_path / "00000.parquet"
    fp = {"model": "m", "prompt": "recap"}
    assert not is_finished(path, fp)
    rows = [Row(key="a", org_caption="a dog", re_caption="A brown dog runs.", finish_reason="stop", re_num_tokens=5,
                repetition=False), Row(key="b", status="skipped", error="zero-byte image file", notes=["x", "y"])]
    stale = tmp_path / ".00000.parquet.abc.tmp"
    stale.write_bytes(b"partial")
    assert remove_stale_temps(path) == [stale] and not stale.exists()
    write_sidecar(path, rows, {"fingerprint": fp, "model": "m"})
    table = pq.read_table(path).to_pylist()
    assert table[0]["re_length"] == 4 and table[0]["org_length"] == 2 and table[1]["notes"] == "x; y"
    assert table[1]["re_caption"] is None and table[1]["status"] == "skipped"
    assert read_info(path)["format"] == "t2i-recap-sidecar/1"
    assert is_finished(path, fp)
    with pytest.raises(SidecarMismatch, match="other settings"):
        is_finished(path, {"model": "other", "prompt": "recap"})
    pq.write_table(pa.table({"key": ["x"]}), tmp_path / "00001.parquet")  # img2dataset's own metadata file
    with pytest.raises(SidecarMismatch, match="not a recaption sidecar"):
        is_finished(tmp_path / "00001.parquet", fp)
