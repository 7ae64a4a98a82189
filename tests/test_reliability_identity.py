"""Identity by content: model folders and shards are named by what they hold, never by their path.

Caption resume and the feature cache key on these digests: changed content is redone, the same
content under another path (a copy, another spelling) is recognised.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from t2i_recap.identity import model_digest, same_content, shard_digest, stamp


# ----------------------------------------------------------------------------- helpers


def png(color="red", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: dict[str, dict[str, bytes]], prefix: str = "") -> Path:
    """A webdataset shard: member `<prefix><key>.<ext>` for every (ext, bytes) of each sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{prefix}{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def simple_samples(n: int, tag: str = "s", color: str = "red") -> dict[str, dict[str, bytes]]:
    return {f"{tag}{i:03d}": {"png": png(color), "txt": f"alt text {tag} {i}".encode()} for i in range(n)}


def fake_model(folder: Path, value: float = 0.0) -> Path:
    """A model folder as save_pretrained writes it: config.json + model.safetensors."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "fake"}')
    save_file({"w": torch.full((4, 4), value)}, str(folder / "model.safetensors"))
    return folder


class EchoBackend:
    """Captions every image with the same words; counts how many images it saw."""

    def __init__(self, text: str = "a red square"):
        self.text, self.seen = text, 0

    def caption(self, images, prompts, max_new_tokens=128):
        from t2i_recap.captioner.backend import Generation

        self.seen += len(images)
        return [Generation(self.text, "stop", 3) for _ in images]

    def describe(self):
        return {"backend": "echo"}


def caption(shards, out, model, backend=None, **kw) -> dict:
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    cfg = CaptionRunConfig(input=str(shards), out=str(out), model=str(model), batch_size=4, max_new_tokens=8, **kw)
    return caption_run(cfg, Dist(), backend or EchoBackend())


# ----------------------------------------------------------------------------- digests


def test_model_digest_follows_content_not_path(tmp_path):
    a = fake_model(tmp_path / "a")
    digest = model_digest(a)
    shutil.copytree(a, tmp_path / "copy", copy_function=shutil.copy)  # new mtimes, new inodes
    assert model_digest(tmp_path / "copy") == digest
    assert model_digest(tmp_path / "a" / ".." / "a") == digest  # another spelling of the same folder
    (tmp_path / "copy" / "README.md").write_text("a model card")  # docs do not change what it computes
    assert model_digest(tmp_path / "copy") == digest
    before = (a / "model.safetensors").read_bytes()
    fake_model(a, value=1.0)  # re-saved in place: same tensor names and shapes, same size, same header
    assert len((a / "model.safetensors").read_bytes()) == len(before)
    assert (a / "model.safetensors").read_bytes()[:64] == before[:64]
    assert model_digest(a) != digest
    (tmp_path / "copy" / "config.json").write_text('{"model_type": "other"}')
    assert model_digest(tmp_path / "copy") != digest
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model_digest(tmp_path / "nowhere")


def test_shard_digest_and_same_content(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", simple_samples(3))
    recorded = {"digest": shard_digest(shard), **stamp(shard)}
    assert same_content(shard, recorded)
    moved = tmp_path / "elsewhere" / "00000.tar"
    moved.parent.mkdir()
    shutil.copy(shard, moved)
    os.utime(moved, ns=(1, 1))
    assert same_content(moved, recorded)  # stamp differs, content equal: hashed and recognised
    write_tar(shard, simple_samples(3, color="blue"))
    assert not same_content(shard, recorded)
    assert not same_content(moved, {**recorded, "digest": None})


# ----------------------------------------------------------------------------- shard ids


@pytest.mark.parametrize("name, expected", [
    ("00012.tar", "00012"), ("web.00000.tar", "web.00000"), ("web.00001.tar", "web.00001"),
    ("part.tar.gz", "part"), ("x.y.tgz", "x.y"), ("a.b.parquet", "a.b"), ("notes", "notes"),
])
def test_shard_id_is_one_name_for_any_file_name(tmp_path, name, expected):
    from t2i_recap.captioner.readers import shard_name
    from t2i_recap.captioner.writer import sidecar_path
    from t2i_recap.shards import shard_id

    assert shard_id(tmp_path / name) == expected
    assert shard_name(tmp_path / name) == expected
    assert sidecar_path(tmp_path, shard_id(tmp_path / name)).name == f"{expected}.parquet"


def test_members_stored_as_dot_slash_are_samples(tmp_path):
    from t2i_recap.shards import iter_tar_samples

    path = tmp_path / "dot.tar"
    with tarfile.open(path, "w") as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
    write_tar(tmp_path / "tmp.tar", simple_samples(2), prefix="./")
    with tarfile.open(path, "a") as tar, tarfile.open(tmp_path / "tmp.tar") as src:
        for m in src:
            tar.addfile(m, src.extractfile(m))
    samples = list(iter_tar_samples(path))
    assert [s.key for s in samples] == ["s000", "s001"]
    assert all(s.error is None and set(s.files) == {"png", "txt"} for s in samples)


# ----------------------------------------------------------------------------- caption resume


@pytest.fixture
def captioned(tmp_path):
    shards = tmp_path / "shards"
    for i in range(2):
        write_tar(shards / f"{i:05d}.tar", simple_samples(3, tag=f"k{i}"))
    model = fake_model(tmp_path / "models" / "captioner")
    out = tmp_path / "recaps"
    first = caption(shards, out, model)
    assert first["shards_done"] == 2
    return shards, model, out


def test_same_captioner_copied_or_respelled_resumes(captioned, tmp_path):
    shards, model, out = captioned
    copy = tmp_path / "other" / "captioner"
    shutil.copytree(model, copy, copy_function=shutil.copy)
    for spelling in (copy, tmp_path / "models" / "." / "captioner", Path(os.path.relpath(model))):
        backend = EchoBackend()
        again = caption(shards, out, spelling, backend)
        assert again["shards_skipped_done"] == 2 and again["shards_done"] == 0 and backend.seen == 0


def test_captioner_replaced_in_place_recaptions(captioned):
    from t2i_recap.captioner.writer import read_info

    shards, model, out = captioned
    old = read_info(out / "00000.parquet")["fingerprint"]["model"]
    fake_model(model, value=2.0)  # fine-tuned and saved over the old weights
    backend = EchoBackend("a blue circle")
    again = caption(shards, out, model, backend)
    assert again["shards_done"] == 2 and backend.seen == 6
    info = read_info(out / "00000.parquet")
    assert info["fingerprint"]["model"] != old and info["fingerprint"]["model"] == model_digest(model)


def test_another_captioner_elsewhere_is_refused(captioned, tmp_path):
    from t2i_recap.captioner.writer import SidecarMismatch

    shards, _, out = captioned
    other = fake_model(tmp_path / "other_model", value=5.0)
    with pytest.raises(SidecarMismatch, match="other settings"):
        caption(shards, out, other)


def test_shard_rewritten_after_captioning_is_recaptioned(captioned, tmp_path):
    import pyarrow.parquet as pq

    shards, model, out = captioned
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved, copy_function=shutil.copy)  # the same shards elsewhere: still done
    assert caption(moved, out, model)["shards_skipped_done"] == 2
    write_tar(shards / "00001.tar", simple_samples(4, tag="new"))  # re-downloaded with other content
    backend = EchoBackend()
    again = caption(shards, out, model, backend)
    assert again["shards_done"] == 1 and again["shards_skipped_done"] == 1 and backend.seen == 4
    assert pq.read_table(out / "00001.parquet").column("key").to_pylist() == [f"new{i:03d}" for i in range(4)]


def test_shard_still_being_written_is_not_marked_done(tmp_path):
    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", simple_samples(3))
    model = fake_model(tmp_path / "model")

    class GrowingDownload(EchoBackend):  # the download goes on while the shard is captioned
        def caption(self, images, prompts, max_new_tokens=128):
            with open(shards / "00000.tar", "ab") as fh:
                fh.write(b"\0" * 512)
            return super().caption(images, prompts, max_new_tokens)

    summary = caption(shards, tmp_path / "out", model, GrowingDownload())
    assert summary["shards_done"] == 0 and "changed while" in summary["shards_failed"][0]["error"]
    assert not (tmp_path / "out" / "00000.parquet").exists()
    assert caption(shards, tmp_path / "out", model)["shards_done"] == 1  # complete now: captioned


# ----------------------------------------------------------------------------- feature cache


def _encoder(vae: Path, clip: Path):
    from t2i_recap.cache import FeatureEncoder, FeaturesConfig
    from t2i_recap.text_encoders import TextEncoderConfig

    return FeatureEncoder(FeaturesConfig(vae=str(vae), dtype="float32", encode_batch_size=4),
                          TextEncoderConfig(name_or_path=str(clip)))


def _resave_with_noise(cls, folder: Path) -> None:
    import torch

    model = cls.from_pretrained(str(folder))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(str(folder))


def test_feature_cache_follows_model_content(tmp_path, train_assets, train_shards):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from t2i_recap import cache
    from t2i_recap.data import DataConfig, WebDatasetSource

    vae, clip = tmp_path / "vae", tmp_path / "clip"
    shutil.copytree(train_assets / "vae", vae)
    shutil.copytree(train_assets / "clip", clip)
    data = DataConfig(shards=str(train_shards[0]), resolution=16, recaption="json:gold_caption")
    src = WebDatasetSource(data)
    enc = _encoder(vae, clip)
    fp = cache.fingerprint_hash(enc.fingerprint(data))
    assert cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp)["built"] == 2
    # the same models under other paths: the same fingerprint, the cache is reused
    assert cache.fingerprint_hash(_encoder(train_assets / "vae", train_assets / "clip").fingerprint(data)) == fp
    assert cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp)["fresh"] == 2

    _resave_with_noise(AutoencoderKL, vae)  # re-saved in the same folder: same names, same sizes
    enc = _encoder(vae, clip)
    fp_vae = cache.fingerprint_hash(enc.fingerprint(data))
    assert fp_vae != fp
    assert cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp_vae)["built"] == 2

    _resave_with_noise(CLIPTextModel, clip)
    enc = _encoder(vae, clip)
    fp_text = cache.fingerprint_hash(enc.fingerprint(data))
    assert fp_text not in (fp, fp_vae)
    assert cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp_text)["built"] == 2


def test_cache_recognises_moved_shards_and_rebuilds_changed_ones(tmp_path, train_assets, train_shards):
    from t2i_recap import cache
    from t2i_recap.data import DataConfig, WebDatasetSource

    moved = tmp_path / "shards"
    shutil.copytree(train_shards[0], moved, copy_function=shutil.copy)
    data = DataConfig(shards=str(moved), resolution=16, recaption="json:gold_caption")
    src = WebDatasetSource(data)
    enc = _encoder(train_assets / "vae", train_assets / "clip")
    fp = cache.fingerprint_hash(enc.fingerprint(data))
    assert cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp)["built"] == 2
    for tar in moved.glob("*.tar"):
        os.utime(tar, ns=(5, 5))  # touched (or copied again): the content decides
    assert cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp)["fresh"] == 2
    with tarfile.open(train_shards[0] / "00000.tar") as t, tarfile.open(moved / "00000.tar", "w") as out:
        for m in list(t)[:6]:  # the shard re-downloaded holding fewer samples
            out.addfile(m, t.extractfile(m))
    summary = cache.prepare_cache(enc, src, data, tmp_path / "cache", fp_hash=fp)
    assert summary["built"] == 1 and summary["fresh"] == 1
