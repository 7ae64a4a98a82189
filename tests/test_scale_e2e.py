"""Data at scale, end to end: shards on an S3-compatible server (moto, on 127.0.0.1) captioned with
`--engine ray --workers 2`, the driver and its workers SIGKILLed mid-run and the run repeated, every
key in exactly one row of the sidecars written back to the store; then `train` reads its shards and
those sidecars straight from s3://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures_captioner import CAPTIONER_SHARD_SIZE, CAPTIONER_SHARDS
from fixtures_train import train_config_dict

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 't2i-recap[ray]'")
pytest.importorskip("s3fs", reason="the s3 extra is not installed: pip install 't2i-recap[s3]'")
from test_storage_s3 import BUCKET, _tar_keys, _upload, s3  # noqa: E402,F401  (s3: the moto server fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(src: str, out: str, model: Path, claims: Path) -> list[str]:
    return [sys.executable, "-m", "t2i_recap.captioner", "--engine", "ray", "--workers", "2",
            "--input", f"{src}/{{00000..{CAPTIONER_SHARDS - 1:05d}}}.tar", "--out", out, "--model", str(model),
            "--batch-size", "1", "--max-new-tokens", "48", "--dtype", "float32", f"--set=claims_dir={claims}",
            "--set=claims.heartbeat_s=0.2", "--set=claims.stale_s=2.0", "--set=claims.poll_s=0.1"]


def _sidecars(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p for p in fs.find(f"{BUCKET}/{prefix}") if p.endswith(".parquet"))


def _holders(claims: Path) -> set[int]:
    pids = set()
    for path in claims.rglob("*.claim"):
        try:
            pids.add(json.loads(path.read_text())["pid"])
        except (OSError, ValueError, KeyError):  # caught mid-write or released meanwhile
            pass
    return pids


def _kill(pid: int) -> bool:
    """SIGKILL `pid`; False when it was already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _settled(fs, claims: Path, quiet: float = 2.0, limit: float = 60.0) -> dict:
    """The sidecars (path -> ETag) once nothing writes any more: a worker that claimed a shard just
    after the last look at the claims outlives the driver and may still upload one; it is killed
    too, and the listing must then stay the same for `quiet` seconds."""
    deadline, last, since = time.monotonic() + limit, None, time.monotonic()
    while time.monotonic() < deadline:
        alive = [pid for pid in _holders(claims) if _kill(pid)]
        now = _sidecars(fs, "scale/sidecars")
        if now != last or alive:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return {p: fs.info(p)["ETag"] for p in now}
        time.sleep(0.2)
    raise AssertionError("the sidecars kept changing after the driver and its workers were killed")


def test_ray_captions_s3_shards_through_a_driver_kill_then_train_reads_them_from_s3(
        s3, tmp_path, captioner_shards, tiny_llava_dir, train_assets):  # noqa: F811 (the imported fixture)
    from safetensors.torch import load_file

    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    src = _upload(s3, captioner_shards, "scale/shards", "*.tar")
    out, claims = f"s3://{BUCKET}/scale/sidecars", tmp_path / "claims"
    driver = subprocess.Popen(_cli(src, out, tiny_llava_dir, claims), env=_env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.monotonic() + 300, set()
    while not (_sidecars(s3, "scale/sidecars") and workers):  # a shard written back, a worker mid-shard
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no shard finished"
        time.sleep(0.05)
        workers = _holders(claims)
    for pid in [driver.pid, *workers]:
        _kill(pid)
    driver.communicate()
    before = _settled(s3, claims)
    assert 1 <= len(before) < CAPTIONER_SHARDS, "the run finished before it could be killed"

    rerun = subprocess.run(_cli(src, out, tiny_llava_dir, claims), env=_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.find("{"):])
    assert summary["engine"] == "ray" and summary["shards_skipped_done"] == len(before)
    paths = _sidecars(s3, "scale/sidecars")
    assert len(paths) == CAPTIONER_SHARDS
    assert all(s3.info(p)["ETag"] == etag for p, etag in before.items())  # finished shards were not redone
    rows = Counter()
    for path in paths:
        with s3.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=["key", "status", "re_caption"]).to_pylist()
        assert all(r["status"] == "ok" and r["re_caption"] for r in table), path
        rows.update(r["key"] for r in table)
    assert rows == Counter(_tar_keys(captioner_shards))  # every key in exactly one row
    assert sum(rows.values()) == CAPTIONER_SHARDS * CAPTIONER_SHARD_SIZE

    run = tmp_path / "run"
    cfg = train_config_dict(train_assets, f"{src}/{{00000..{CAPTIONER_SHARDS - 1:05d}}}.tar", run, out,
                            trainer={"max_steps": 2}, checkpoint={"every_steps": 2})
    cfg["data"]["original_caption"] = "txt"
    summary = train(from_dict(TrainConfig, cfg))
    assert summary["step"] == 2 and summary["mix_counts"]["recaption"] > 0  # the recaptions from the store trained
    weights = load_file(str(run / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert weights and all(v.isfinite().all() for v in weights.values())
