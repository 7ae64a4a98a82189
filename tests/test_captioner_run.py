"""`caption run` end to end: sidecars, bad input, retries, resume after SIGKILL, two-process split."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures_captioner import CAPTIONER_SHARD_SIZE, CAPTIONER_SHARDS, HOSTILE_EXPECT

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _tar_keys(folder: Path) -> list[str]:
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += sorted({m.name.split(".")[0] for m in t.getmembers()})
    return keys


def _sidecar_keys(folder: Path) -> list[str]:
    return [k for f in sorted(folder.glob("*.parquet")) for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]


def _cfg(**kw):
    from t2i_recap.captioner.run import CaptionRunConfig

    return CaptionRunConfig(**{"batch_size": 3, "max_new_tokens": 8, **kw})


class FakeBackend:
    """Echoes the image size; raises on 17-px-wide images, like a processor choking on one input."""

    def caption(self, images, prompts, max_new_tokens=128):
        from t2i_recap.captioner.backend import Generation

        if any(im.width == 17 for im in images):
            raise RuntimeError("cannot process a 17 px image")
        return [Generation(f"an image of {im.width} px, asked: {p[:20]}", "stop", 7) for im, p in zip(images, prompts)]

    def describe(self):
        return {"backend": "fake"}


def test_sidecars_hold_every_sample_with_provenance(captioner_shards, tiny_llava_dir, tmp_path):
    from t2i_recap.captioner.run import caption_run
    from t2i_recap.captioner.writer import read_info

    out = tmp_path / "recaps"
    cfg = _cfg(input=str(captioner_shards), out=str(out), model=str(tiny_llava_dir), prompt="conditioned")
    summary = caption_run(cfg)
    assert summary["shards_done"] == CAPTIONER_SHARDS and summary["counts"]["ok"] == CAPTIONER_SHARDS * CAPTIONER_SHARD_SIZE
    assert _sidecar_keys(out) == _tar_keys(captioner_shards)
    rows = pq.read_table(out / "00001.parquet").to_pylist()
    assert list(rows[0]) == ["key", "org_caption", "re_caption", "re_length", "org_length", "status", "error",
                             "finish_reason", "repetition", "re_num_tokens", "notes", "url", "sha256"]
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None and r["org_caption"]
        assert r["finish_reason"] in ("stop", "length") and r["re_num_tokens"] <= 8
        assert r["re_length"] == len(r["re_caption"].split()) and r["org_length"] == len(r["org_caption"].split())
    info = read_info(out / "00001.parquet")
    assert info["model"] == str(tiny_llava_dir) and info["prompt"]["preset"] == "conditioned"
    assert "ALT-TEXT" in info["prompt"]["example"] and info["generation"]["max_new_tokens"] == 8
    assert info["backend"]["model_class"] == "LlavaForConditionalGeneration" and info["counts"]["ok"] == CAPTIONER_SHARD_SIZE
    assert info["shard"]["source"].endswith("00001.tar") and info["images_per_second"] > 0
    assert (out / "caption_config.yaml").exists()

    again = caption_run(cfg, backend=FakeBackend())  # nothing left to do: the backend is never called
    assert again["shards_skipped_done"] == CAPTIONER_SHARDS and again["shards_done"] == 0
    with pytest.raises(ValueError, match="other settings"):
        caption_run(_cfg(input=str(captioner_shards), out=str(out), model=str(tiny_llava_dir), max_new_tokens=9))


def test_hostile_inputs_are_captioned_or_skipped_with_reason(hostile_shard, tiny_llava_dir, tmp_path):
    from t2i_recap.captioner.run import main

    out = tmp_path / "out"
    rc = main(["--input", str(hostile_shard), "--out", str(out), "--model", str(tiny_llava_dir),
               "--prompt", "conditioned", "--batch-size", "4", "--max-new-tokens", "4"])
    assert rc == 0
    table = pq.read_table(out / "00000.parquet").to_pylist()
    goods = [r for r in table if r["key"] == "good"]
    assert [r["status"] for r in goods] == ["ok", "skipped"] and "duplicate key" in goods[1]["error"]
    rows = {r["key"]: r for r in table if r not in goods[1:]}
    for key, (status, reason) in HOSTILE_EXPECT.items():
        row = rows[key]
        assert row["status"] == status, (key, row)
        if status == "skipped":
            assert reason in row["error"] and row["re_caption"] is None, (key, row)
        else:
            assert row["re_caption"] is not None and row["error"] is None
            if reason:
                assert reason in (row["notes"] or ""), (key, row)
    for key in ("../escape", "sub/dir", "bad key"):
        assert rows[key]["status"] == "skipped" and "unsafe sample key" in rows[key]["error"]
    assert rows["latin1"]["org_caption"] == "caf\ufffd latte"
    assert len(rows["hugecaption"]["org_caption"]) == 20_000
    assert "original caption cut" in rows["hugecaption"]["notes"]  # the prompt got a shorter hint
    assert sorted(os.listdir(out)) == ["00000.parquet", "caption_config.yaml"]  # nothing written by key


class PipelinedFake(FakeBackend):
    """The same, split into `prepare` (run in a thread, one batch ahead) and `generate`."""

    def prepare(self, images, prompts):
        if any(im.width == 17 for im in images):
            raise RuntimeError("cannot process a 17 px image")
        return list(zip(images, prompts))

    def generate(self, prepared, max_new_tokens=128):
        return self.caption([p[0] for p in prepared], [p[1] for p in prepared], max_new_tokens)


@pytest.mark.parametrize("fake", [FakeBackend, PipelinedFake])
def test_a_failing_sample_is_retried_alone(fake):
    from PIL import Image

    from t2i_recap.captioner.readers import Sample, Shard
    from t2i_recap.captioner.run import ShardCaptioner

    widths = [10, 11, 17, 12, 13]
    shard = Shard("s", "test", lambda: iter(Sample(key=f"k{i}", shard="s", image=Image.new("RGB", (w, 8)))
                                              for i, w in enumerate(widths)))
    rows, counts = ShardCaptioner(fake(), _cfg(batch_size=2)).run(shard)
    assert [r.status for r in rows] == ["ok", "ok", "failed", "ok", "ok"]
    assert [r.re_caption.split(",")[0] for r in rows if r.status == "ok"] == [
        f"an image of {w} px" for w in widths if w != 17]  # each caption landed in its own row
    assert "cannot process a 17 px image" in rows[2].error and (counts.ok, counts.failed) == (4, 1)
    all_bad = Shard("t", "test", lambda: iter([Sample(key="k", shard="t", image=Image.new("RGB", (17, 8)))]))
    with pytest.raises(RuntimeError, match="every sample failed"):
        ShardCaptioner(fake(), _cfg()).run(all_bad)


def test_unreadable_shard_is_reported_and_the_rest_captioned(captioner_shards, tmp_path):
    import shutil

    from t2i_recap.captioner.run import caption_run

    src = tmp_path / "in"
    shutil.copytree(captioner_shards, src)
    (src / "00002.tar").write_bytes(b"this is not a tar file at all" * 20)
    summary = caption_run(_cfg(input=str(src), out=str(tmp_path / "out"), model="unused"), backend=FakeBackend())
    assert [f["shard"] for f in summary["shards_failed"]] == ["00002"]
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.parquet")) == ["00000", "00001", "00003"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "t2i_recap.captioner", *args]


def test_resume_after_sigkill(captioner_shards, tiny_llava_dir, tmp_path):
    """A run killed mid-way, rerun, ends with every input sample in exactly one row."""
    out = tmp_path / "out"
    args = ["--input", str(captioner_shards), "--out", str(out), "--model", str(tiny_llava_dir),
            "--batch-size", "1", "--max-new-tokens", "48"]
    proc = subprocess.Popen(_cli(*args), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(out.glob("*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert 1 <= len(done_before) < CAPTIONER_SHARDS, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    rerun = subprocess.run(_cli(*args), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _sidecar_keys(out) == _tar_keys(captioner_shards)  # all samples, each exactly once, in order
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished shards were not redone
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--multi_gpu", "--cpu"])
def test_two_process_split(captioner_shards, tiny_llava_dir, tmp_path, flag):
    """Under `accelerate launch` shard i goes to rank i % 2: no overlap, no gap.

    `--multi_gpu` runs torchrun, which starts two processes on a CPU-only machine too. accelerate's
    `--cpu` launcher starts ONE process (accelerate 1.x: only mpirun spreads CPU jobs); the captioner
    sees that, reads N from the launcher and relaunches itself as N torchrun processes."""
    from t2i_recap.captioner.writer import read_info

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", flag, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "t2i_recap.captioner", "--input", str(captioner_shards), "--out", str(out),
           "--model", str(tiny_llava_dir), "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"]
    res = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("relaunching as 2 CPU processes" in res.stderr) == (flag == "--cpu")
    ranks = {p.stem: read_info(p)["rank"] for p in sorted(out.glob("*.parquet"))}
    assert ranks == {"00000": 0, "00001": 1, "00002": 0, "00003": 1}
    assert all(read_info(p)["world_size"] == 2 for p in out.glob("*.parquet"))
    assert _sidecar_keys(out) == _tar_keys(captioner_shards)
