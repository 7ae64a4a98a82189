"""Real photographs in img2dataset shards: the captioner and the trainer see the same pixels
(EXIF orientation, modes, bit depth), because both decode through t2i_recap.images."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_real import EXIF_ORIENTATION, RECAP, shard_by_name
from PIL import Image, ImageOps

from t2i_recap.shards import iter_tar_samples

RES = 32


def _member(tar, key: str, ext: str) -> bytes:
    return next(raw.files[ext] for raw in iter_tar_samples(tar) if raw.key == key)


def _fit(img: Image.Image) -> torch.Tensor:
    img = ImageOps.fit(img.convert("RGB"), (RES, RES), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _trainer_examples(folder) -> dict:
    from t2i_recap.data import DataConfig, WebDatasetSource

    src = WebDatasetSource(DataConfig(shards=str(folder), resolution=RES, original_caption="json:org_caption",
                                      recaption="txt"))
    return {rec.key: src.decode(rec) for i in range(len(src.shards)) for rec in src.records(i)}


def _captioner_samples(folder) -> dict:
    from t2i_recap.captioner.readers import open_shards

    return {s.key: s for shard in open_shards(str(folder)) for s in shard.samples()}


def test_img2dataset_kept_the_original_bytes_with_their_exif(real_shards, real_photo_bytes):
    key, tar = shard_by_name(real_shards["jpg"])["exif_rotated.jpg"]
    data = _member(tar, key, "jpg")
    assert data == real_photo_bytes["jpg"]["exif_rotated.jpg"]
    assert Image.open(io.BytesIO(data)).getexif()[EXIF_ORIENTATION] == 6


def test_exif_rotated_photo_trains_upright_and_the_captioner_notes_it(real_shards):
    key, tar = shard_by_name(real_shards["jpg"])["exif_rotated.jpg"]
    raw = Image.open(io.BytesIO(_member(tar, key, "jpg")))
    upright = ImageOps.exif_transpose(raw)
    assert upright.size == (160, 107) and raw.size == (107, 160)  # stored sideways

    pixels = _trainer_examples(real_shards["jpg"])[key]["pixels"]
    assert torch.allclose(pixels, _fit(upright), atol=1e-6)
    assert not torch.allclose(pixels, _fit(raw), atol=0.1)  # the sideways decode the trainer used to make

    sample = _captioner_samples(real_shards["jpg"])[key]
    assert sample.image.size == upright.size
    assert any("EXIF orientation 6 applied" in n for n in sample.notes), sample.notes
    assert torch.allclose(_fit(sample.image), pixels, atol=1e-6)  # the caption describes the trained pixels


def test_the_sidecar_row_of_a_rotated_photo_records_the_rotation(real_shards, tmp_path):
    from test_reliability_bad_input import EchoBackend

    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    summary = caption_run(CaptionRunConfig(input=str(real_shards["jpg"]), out=str(tmp_path / "recaps"), model="echo"),
                          Dist(), EchoBackend())
    assert not summary["shards_failed"], summary
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "recaps" / "00000.parquet").to_pylist()}
    names = shard_by_name(real_shards["jpg"])
    rotated = rows[names["exif_rotated.jpg"][0]]
    assert rotated["status"] == "ok" and "EXIF orientation 6" in rotated["notes"]
    assert rotated["re_caption"] == "an image 160x107"  # the captioner saw it upright
    assert "EXIF" not in (rows[names["astronaut.jpg"][0]]["notes"] or "")
    assert rotated["org_caption"] != RECAP.format("exif_rotated.jpg")  # the alt-text, not the .txt recaption


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_every_real_variant_decodes_to_the_same_pixels_for_captioner_and_trainer(real_shards, fmt):
    examples, samples = _trainer_examples(real_shards[fmt]), _captioner_samples(real_shards[fmt])
    assert examples and sorted(examples) == sorted(samples)
    for key, ex in examples.items():
        assert samples[key].error is None and not isinstance(ex, tuple), (key, ex)
        assert torch.allclose(_fit(samples[key].image), ex["pixels"], atol=1e-6), key


def test_modes_and_bit_depths_of_real_photos_are_converted_not_clipped(real_shards, real_photo_bytes):
    from t2i_recap.images import decode_image

    rgba = decode_image(real_photo_bytes["png"]["rgba.png"])
    assert rgba.image.getpixel((0, 0)) == (255, 255, 255) and any("composited" in n for n in rgba.notes)
    samples = {name: _captioner_samples(real_shards[name.rsplit(".", 1)[1]])[key]
               for name, (key, _) in {**shard_by_name(real_shards["jpg"]), **shard_by_name(real_shards["png"])}.items()}
    sixteen = np.asarray(samples["gray16.png"].image)
    assert 40 < sixteen.mean() < 200 and sixteen.std() > 20  # PIL's plain convert clips 16-bit to white
    # img2dataset itself composites RGBA onto white when it re-encodes (its resizer's alpha matting)
    assert samples["rgba.png"].image.getpixel((0, 0)) == (255, 255, 255)
    assert samples["cmyk.jpg"].image.mode == "RGB"  # img2dataset re-encodes CMYK (cv2 reads it as BGR)
    assert any("CMYK converted" in n for n in decode_image(real_photo_bytes["jpg"]["cmyk.jpg"]).notes)
    gray = np.asarray(samples["gray.jpg"].image)
    assert gray.shape[2] == 3 and (gray[..., 0] == gray[..., 1]).all()
    assert samples["large.jpg"].image.size == (2560, 1707)
