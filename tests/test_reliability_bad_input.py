"""The bad-input catalogue: every case has a defined outcome, and a test that checks it.

Outcomes: OK (used, with a note saying what was converted), SKIPPED (a row with status "skipped"
and the reason in `error`; training logs the sample as skipped with its reason), ERROR (a clear
error naming the input). Each case runs through the real code path: `caption run` on a shard
holding the case (plus one good sample) and, where the case reaches training, the trainer's
webdataset source. docs/RELIABILITY.md prints this table; `covered_by` names the area tests that
check the same case in more depth.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_captioner import encode, hostile_images

GOOD_PNG = encode(Image.new("RGB", (24, 16), (200, 40, 40)), "PNG")


@dataclasses.dataclass
class Case:
    id: str
    outcome: str  # what the catalogue promises, printed in docs/RELIABILITY.md
    check: Callable
    covered_by: str = ""


class EchoBackend:
    """Stands in for the captioner model where the model is not the point (fast)."""

    def caption(self, images, prompts, max_new_tokens=128, **_):
        from t2i_recap.captioner.backend import Generation

        return [Generation(f"an image {im.width}x{im.height}", "stop", 3) for im in images]

    def describe(self):
        return {"backend": "echo"}


# ---------------------------------------------------------------- helpers


def write_tar(path: Path, members: list) -> Path:
    """members: (name, bytes) for files, (name, "->", target) for symlinks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 3:
                info.type, info.linkname = tarfile.SYMTYPE, m[2]
                tar.addfile(info)
            else:
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def sample(key: str, image: bytes | None, caption: bytes | None = b"a caption", ext: str = "jpg") -> list:
    out = [] if image is None else [(f"{key}.{ext}", image)]
    return out + ([] if caption is None else [(f"{key}.txt", caption)])


def caption(tmp_path: Path, members: list, backend=None, **cfg) -> dict:
    """Caption one shard = `members` + a good sample; returns {key: row} (duplicates as a list)."""
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    write_tar(tmp_path / "in" / "00000.tar", members + sample("zzgood", GOOD_PNG, ext="png"))
    summary = caption_run(CaptionRunConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), model="echo",
                                           **cfg), Dist(), backend or EchoBackend())
    assert not summary["shards_failed"], summary
    rows: dict = {}
    for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist():
        rows.setdefault(r["key"], []).append(r)
    assert rows["zzgood"][0]["status"] == "ok"
    return {k: v[0] if len(v) == 1 else v for k, v in rows.items()}


def train_decode(tmp_path: Path, members: list) -> dict:
    """The trainer's view of the same shard: {key: example dict or Skip}."""
    from t2i_recap.data import DataConfig, WebDatasetSource

    # + a good sample, as caption() adds: a shard where a caption spec finds nothing at all is an error
    write_tar(tmp_path / "train" / "00000.tar", members + sample("zzgood", GOOD_PNG, ext="png"))
    src = WebDatasetSource(DataConfig(shards=str(tmp_path / "train"), resolution=16, original_caption="txt",
                                      recaption="txt", image_extensions=["jpg", "png", "gif"]))
    return {rec.key: src.decode(rec) for rec in src.records(0)}


def skipped(row: dict, reason: str) -> None:
    assert row["status"] == "skipped" and reason in row["error"] and row["re_caption"] is None, row


def ok(row: dict, note: str | None = None) -> None:
    assert row["status"] == "ok" and row["re_caption"] and row["error"] is None, row
    if note:
        assert note in (row["notes"] or ""), row


def train_skipped(result, reason: str) -> None:
    from t2i_recap.data import Skip

    assert isinstance(result, Skip) and reason in result.reason, result


def train_ok(result) -> None:
    assert isinstance(result, dict) and tuple(result["pixels"].shape) == (3, 16, 16), result


# ---------------------------------------------------------------- image cases


def check_image(image: str, status: str, reason: str, train: str | None):
    """A hostile image from fixtures_captioner.hostile_images: captioner outcome + trainer outcome."""
    def check(tmp_path, name):
        ext, data = hostile_images()[image]
        row = caption(tmp_path, sample("x", data, ext=ext))["x"]
        ok(row, reason) if status == "ok" else skipped(row, reason)
        if train is not None:
            result = train_decode(tmp_path, sample("x", data, ext=ext))["x"]
            train_ok(result) if train == "ok" else train_skipped(result, train)
            if image == "sixteenbit":  # mid-grey stays mid-grey (PIL's plain convert clips it to white)
                assert abs(float(result["pixels"].mean())) < 0.05
    return check


def check_real_model_size(size: tuple[int, int]):
    """Odd shapes go through the real processor of the tiny LLaVA (resize + crop), not a stand-in."""
    def check(tmp_path, name, llava_backend):
        data = encode(Image.new("RGB", size, (10, 200, 10)), "PNG")
        ok(caption(tmp_path, sample("x", data, ext="png"), backend=llava_backend, max_new_tokens=3)["x"])
        train_ok(train_decode(tmp_path, sample("x", data, ext="png"))["x"])
    return check


# ---------------------------------------------------------------- caption cases


def check_missing_caption(tmp_path, name):
    row = caption(tmp_path, sample("x", GOOD_PNG, caption=None, ext="png"), prompt="conditioned")["x"]
    ok(row, "no original caption")
    assert row["org_caption"] is None
    train_skipped(train_decode(tmp_path, sample("x", GOOD_PNG, caption=None, ext="png"))["x"],
                  "neither an original caption nor a recaption")


def check_non_utf8(tmp_path, name):
    row = caption(tmp_path, sample("x", GOOD_PNG, caption="caf\u00e9 cr\u00e8me".encode("latin-1"), ext="png"))["x"]
    ok(row, "not valid UTF-8")
    assert row["org_caption"] == "caf\ufffd cr\ufffdme"


def check_empty_caption(tmp_path, name):
    row = caption(tmp_path, sample("x", GOOD_PNG, caption=b"  \n\t ", ext="png"))["x"]
    ok(row)
    assert row["org_caption"] is None and row["org_length"] is None  # blank counts as missing, not as ""


def check_long_caption(tmp_path, name):
    text = ("word " * 2000).strip()  # 9,999 characters
    row = caption(tmp_path, sample("x", GOOD_PNG, caption=text.encode(), ext="png"), prompt="conditioned")["x"]
    ok(row, "original caption cut")  # the prompt carries a shortened hint, with a note
    assert row["org_caption"] == text and row["org_length"] == 2000  # the sidecar keeps it whole
    result = train_decode(tmp_path, sample("x", GOOD_PNG, caption=text.encode(), ext="png"))["x"]
    train_ok(result)  # the text encoder truncates at its limit and the trainer counts truncations


# ---------------------------------------------------------------- key and member cases


def check_duplicate_in_shard(tmp_path, name):
    # not adjacent: adjacent members with one key are one webdataset sample
    rows = caption(tmp_path, sample("x", GOOD_PNG, ext="png") + sample("y", GOOD_PNG, ext="png")
                   + sample("x", GOOD_PNG, caption=b"again", ext="png"))
    first, second = rows["x"]
    ok(first)
    skipped(second, "duplicate key 'x' in shard 00000")


def check_duplicate_across_shards(tmp_path, name):
    """Kept in both shards: sidecars are per shard and every join is by (shard, key), never by key alone."""
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.data import DataConfig, WebDatasetSource

    write_tar(tmp_path / "in" / "00000.tar", sample("dup", GOOD_PNG, caption=b"first shard", ext="png"))
    write_tar(tmp_path / "in" / "00001.tar", sample("dup", GOOD_PNG, caption=b"second shard", ext="png"))
    caption_run(CaptionRunConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), model="echo"), Dist(),
                EchoBackend())
    for shard, text in (("00000", "first shard"), ("00001", "second shard")):
        (row,) = pq.read_table(tmp_path / "out" / f"{shard}.parquet").to_pylist()
        assert row["key"] == "dup" and row["org_caption"] == text and row["status"] == "ok"
    src = WebDatasetSource(DataConfig(shards=str(tmp_path / "in"), resolution=16, original_caption="txt",
                                      recaption="sidecar:org_caption", recaption_dir=str(tmp_path / "out")))
    joined = [src.decode(rec)["recaption"] for i in range(2) for rec in src.records(i)]
    assert joined == ["first shard", "second shard"]  # each shard joined its own sidecar row


def check_unsafe_key(key: str):
    def check(tmp_path, name):
        skipped(caption(tmp_path, sample(key, GOOD_PNG, ext="png"))[key], "unsafe sample key")
        train_skipped(train_decode(tmp_path, sample(key, GOOD_PNG, ext="png"))[key], "unsafe sample key")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.parquet", "caption_config.yaml"]
    return check


def check_member_outside(tmp_path, name):
    """A member named ../../x and a symlink to /etc/passwd: nothing is extracted, both are skipped."""
    members = sample("../../outside", GOOD_PNG, ext="png") + [("link.png", "->", "/etc/passwd"), ("link.txt", b"c")]
    rows = caption(tmp_path, members)
    skipped(rows["../../outside"], "unsafe sample key")
    skipped(rows["link"], "not a regular file")
    decoded = train_decode(tmp_path, members)
    train_skipped(decoded["link"], "not a regular file")
    assert not (tmp_path.parent / "outside.png").exists() and not (tmp_path / "outside.png").exists()


# ---------------------------------------------------------------- whole-file cases


def check_malformed_parquet_input(tmp_path, name):
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    pq.write_table(__import__("pyarrow").table({"key": ["k"], "image": [GOOD_PNG], "caption": ["c"]}),
                   tmp_path / "in" / "good.parquet")
    summary = caption_run(CaptionRunConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), model="echo"),
                          Dist(), EchoBackend())
    assert [f["shard"] for f in summary["shards_failed"]] == ["broken"]  # named; the other shard is done
    assert "broken.parquet" in summary["shards_failed"][0]["error"] or "Parquet" in summary["shards_failed"][0]["error"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["good.parquet"]


def check_malformed_sidecar(tmp_path, name):
    from t2i_recap.data import DataConfig, WebDatasetSource

    write_tar(tmp_path / "in" / "00000.tar", sample("k", GOOD_PNG, ext="png"))
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "00000.parquet").write_bytes(b"PAR1 garbage")
    src = WebDatasetSource(DataConfig(shards=str(tmp_path / "in"), recaption_dir=str(tmp_path / "side")))
    with pytest.raises(Exception, match="00000.parquet"):
        list(src.records(0))


def check_truncated_tar(tmp_path, name):
    path = write_tar(tmp_path / "in" / "00000.tar", sample("a", GOOD_PNG, ext="png") + sample("b", GOOD_PNG * 40, ext="png"))
    path.write_bytes(path.read_bytes()[:3000])  # cut inside b's image
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    caption_run(CaptionRunConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), model="echo"), Dist(),
                EchoBackend())
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    ok(rows["a"])
    skipped(rows["b"], "damaged")


def check_missing_shard(tmp_path, name):
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    write_tar(tmp_path / "in" / "00000.tar", sample("k", GOOD_PNG, ext="png"))
    with pytest.raises(FileNotFoundError, match="00001.tar does not exist"):
        caption_run(CaptionRunConfig(input=str(tmp_path / "in" / "{00000..00001}.tar"), out=str(tmp_path / "out"),
                                     model="echo"), Dist(), EchoBackend())


def check_config(text: str, message: str):
    def check(tmp_path, name):
        from t2i_recap.config import ConfigError, load_config
        from t2i_recap.train_config import TrainConfig
        from t2i_recap.captioner.run import CaptionRunConfig

        path = tmp_path / "bad.yaml"
        path.write_text(text)
        cls = CaptionRunConfig if text.startswith("reader") or text.startswith("batch") else TrainConfig
        with pytest.raises(ConfigError) as info:
            load_config(cls, path)
        assert message in str(info.value) and str(path) in str(info.value), str(info.value)
    return check


def check_missing_model(tmp_path, name, train_assets):
    from t2i_recap.captioner.run import main
    from t2i_recap.cache import FeatureEncoder, FeaturesConfig
    from t2i_recap.text_encoders import TextEncoderConfig

    write_tar(tmp_path / "in" / "00000.tar", sample("k", GOOD_PNG, ext="png"))
    missing = str(tmp_path / "no" / "such" / "model")
    assert main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", missing]) == 2
    with pytest.raises(FileNotFoundError, match=f"text_encoder.name_or_path '{missing}'"):
        FeatureEncoder(FeaturesConfig(vae=str(train_assets / "vae")), TextEncoderConfig(name_or_path=missing))
    with pytest.raises(FileNotFoundError, match=f"features.vae '{missing}'"):
        FeatureEncoder(FeaturesConfig(vae=missing), TextEncoderConfig(name_or_path=str(train_assets / "clip")))


def check_one_sampler_step(tmp_path, name, eval_pipeline_dir):
    """DDIM returns its x0 prediction and handles 1 step; DPM-Solver does not, and says so."""
    from diffusers import DPMSolverMultistepScheduler

    from t2i_recap.generation import generate_images, load_pipeline

    pipe, settings = load_pipeline(eval_pipeline_dir)
    kw = dict(num_inference_steps=1, guidance_scale=1.0, resolution=settings["resolution"],
              max_sequence_length=settings["max_sequence_length"])
    assert len(generate_images(pipe, ["a red circle"], [0], **kw)) == 1
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="num_inference_steps=1 is not supported by DPMSolverMultistepScheduler"):
        generate_images(pipe, ["a red circle"], [0], **kw)


CATALOGUE = [
    Case("truncated_jpeg", "SKIPPED: corrupt or truncated image data (captioner); skipped, image does not decode (trainer)",
         check_image("truncated", "skipped", "truncated", "does not decode"), "test_captioner_inputs.py, test_captioner_run.py"),
    Case("zerobyte", "SKIPPED: zero-byte image file", check_image("zerobyte", "skipped", "zero-byte", "does not decode"),
         "test_captioner_inputs.py"),
    Case("notimage", "SKIPPED: not a recognised image format (HTML bytes named .jpg)",
         check_image("notimage", "skipped", "not a recognised image", "does not decode"), "test_captioner_inputs.py"),
    Case("bomb", "SKIPPED: decompression bomb, refused from the header before any pixel is allocated",
         check_image("bomb", "skipped", "decompression bomb", "does not decode"), "test_captioner_inputs.py"),
    Case("one_by_one", "OK: a 1x1 image is captioned (processor resizes) and trained on",
         check_real_model_size((1, 1))),
    Case("extreme_aspect", "OK: a 2000x2 image is captioned and trained on (resize + centre crop)",
         check_real_model_size((2000, 2))),
    Case("cmyk", "OK, noted: CMYK converted to RGB", check_image("cmyk", "ok", "CMYK converted", "ok"),
         "test_captioner_inputs.py::test_conversions_keep_the_content"),
    Case("sixteenbit", "OK, noted: 16-bit rescaled to 8-bit (not clipped to white)",
         check_image("sixteenbit", "ok", "rescaled to 8-bit", "ok"), "test_captioner_inputs.py"),
    Case("palette", "OK, noted: palette transparency composited onto white",
         check_image("palette", "ok", "transparency composited", "ok"), "test_captioner_inputs.py"),
    Case("animated", "OK, noted: animated GIF, first of 3 frames used", check_image("animated", "ok", "first of 3 frames", "ok"),
         "test_captioner_inputs.py"),
    Case("missing_caption", "OK, noted: no original caption (conditioned prompt falls back); trainer skips a sample "
         "with neither caption", check_missing_caption, "test_captioner_run.py, test_train_mixing.py"),
    Case("non_utf8_caption", "OK, noted: not valid UTF-8, bad bytes replaced", check_non_utf8,
         "test_captioner_inputs.py::test_caption_decoding"),
    Case("empty_caption", "OK: a blank caption counts as missing (None, not '')", check_empty_caption),
    Case("caption_10k_chars", "OK, noted: kept whole in the sidecar; the prompt hint is cut (note); the text encoder "
         "truncates and the trainer counts it", check_long_caption, "test_captioner_run.py (hugecaption)"),
    Case("duplicate_key_in_shard", "SKIPPED: duplicate key in shard (the first is captioned)",
         check_duplicate_in_shard, "test_captioner_run.py"),
    Case("duplicate_key_across_shards", "OK: kept in each shard's own sidecar; every join is by (shard, key), so no "
         "row picks up another shard's caption", check_duplicate_across_shards),
    Case("key_with_slash", "SKIPPED: unsafe sample key 'a/b' (captioner and trainer); nothing written by key",
         check_unsafe_key("a/b"), "test_io.py::test_unsafe_keys_refused"),
    Case("key_with_dotdot", "SKIPPED: unsafe sample key 'sub/../../x'", check_unsafe_key("sub/../../x"), "test_io.py"),
    Case("tar_member_outside", "SKIPPED: member '../../outside.png' (unsafe key) and a symlink to /etc/passwd "
         "(not a regular file); nothing is extracted", check_member_outside, "test_captioner_run.py"),
    Case("malformed_parquet_input", "ERROR naming the shard: reported in the summary (exit 1), other shards done",
         check_malformed_parquet_input, "test_captioner_run.py::test_unreadable_shard_is_reported_and_the_rest_captioned"),
    Case("malformed_sidecar", "ERROR naming the sidecar file (training)", check_malformed_sidecar),
    Case("truncated_tar", "OK + SKIPPED: samples before the damage captioned, then 'shard is damaged here'",
         check_truncated_tar),
    Case("missing_shard", "ERROR: shard 00001.tar does not exist (brace pattern)", check_missing_shard,
         "test_io.py::test_expand_shards_patterns"),
    Case("config_unknown_key", "ERROR: ConfigError naming file and key (trainer.max_stepz: unknown key)",
         check_config("trainer:\n  max_stepz: 3\n", "trainer.max_stepz: unknown key"), "test_config.py"),
    Case("config_wrong_type", "ERROR: ConfigError naming file and key (expected an integer)",
         check_config("batch_size: many\n", "batch_size: expected an integer"), "test_config.py"),
    Case("sampler_steps_1", "ERROR naming the scheduler when it cannot take 1 step (was an IndexError inside "
         "diffusers' PixArt pipeline); DDIM's 1 step still works", check_one_sampler_step),
    Case("missing_model_path", "ERROR naming the path: captioner exits 2; text encoder / VAE FileNotFoundError naming "
         "the config key", check_missing_model),
]
assert len(CATALOGUE) >= 20 and len({c.id for c in CATALOGUE}) == len(CATALOGUE)


@pytest.fixture(scope="module")
def llava_backend(tiny_llava_dir):
    from t2i_recap.captioner.backend import TransformersBackend

    return TransformersBackend(str(tiny_llava_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.id)
def test_catalogue_case(case, tmp_path, request, one_thread):
    import inspect

    wanted = list(inspect.signature(case.check).parameters)[2:]  # fixtures the case needs
    case.check(tmp_path, case.id, *[request.getfixturevalue(f) for f in wanted])


def catalogue_markdown() -> str:
    """The table docs/RELIABILITY.md shows (python -c 'import test_reliability_bad_input as t; print(t.catalogue_markdown())')."""
    lines = ["| case | defined outcome | also covered by |", "|---|---|---|"]
    lines += [f"| `{c.id}` | {c.outcome} | {c.covered_by or '-'} |" for c in CATALOGUE]
    return "\n".join(lines)
