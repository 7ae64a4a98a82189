"""`caption run --engine ray` on a local Ray instance of 2 CPUs: shards handed to 2 workers as they
free up, the same sidecars as the accelerate path, a killed worker's shard retried elsewhere (and
reported failed once its retries are spent), a killed driver rerun to exactly one row per key, a
Ray run and an accelerate run on one folder kept apart by the per-shard claims.

One Ray instance serves the whole module (starting one takes 10-20 s on 2 busy cores); only the
driver-kill test's rerun starts its own, the default of the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures_captioner import CAPTIONER_SHARD_SIZE, CAPTIONER_SHARDS

REPO = Path(__file__).resolve().parents[1]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0"}  # nothing outside is reached
CLAIMS = {"heartbeat_s": 0.2, "stale_s": 2.0, "poll_s": 0.1}
# Metadata that differs between two runs of the same shard by design: when, how fast, by which process.
VOLATILE = {"finished_at", "images_per_second", "claim", "engine", "rank", "world_size"}


# ---------------------------------------------------------------- settings (no Ray started)


def test_engine_settings_are_checked():
    from t2i_recap.captioner.run import CaptionRunConfig, caption_run

    with pytest.raises(ValueError, match="only for engine ray"):
        CaptionRunConfig(workers=2)
    with pytest.raises(ValueError, match="only for engine ray"):
        CaptionRunConfig(ray_address="auto")
    for bad in ({"workers": 0}, {"ray_max_retries": -1}, {"ray_cpus_per_worker": 0}, {"ray_gpus_per_worker": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CaptionRunConfig(engine="ray", **bad)
    with pytest.raises(ValueError, match="pass neither dist nor backend"):
        caption_run(CaptionRunConfig(engine="ray", input="x", out="y", model="z"), backend=object())


def test_a_missing_ray_names_the_extra(monkeypatch, tmp_path):
    import t2i_recap.extras as extras
    from t2i_recap.captioner.run import CaptionRunConfig, caption_run
    from t2i_recap.extras import MissingExtraError

    real = extras.available
    monkeypatch.setattr(extras, "available", lambda module: module != "ray" and real(module))
    with pytest.raises(MissingExtraError, match=r"t2i-recap\[ray\]"):
        caption_run(CaptionRunConfig(engine="ray", input=str(tmp_path), out=str(tmp_path / "o"), model="m"))


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs for this module; yields its address for other drivers to join."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 't2i-recap[ray]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """Torch in this process on one thread, as in each Ray worker: on 2 shared cores, more threads only
    wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(shards: Path, out: Path, model: Path, **kw):
    from t2i_recap.captioner.run import CaptionRunConfig
    from t2i_recap.claims import ClaimConfig

    return CaptionRunConfig(**{"input": str(shards), "out": str(out), "model": str(model), "batch_size": 1,
                               "max_new_tokens": 48, "dtype": "float32", "device": "cpu",
                               "claims": ClaimConfig(**CLAIMS), **kw})


def _rows_per_key(out: Path) -> Counter:
    rows = Counter()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "status"]).to_pylist()
        assert all(r["status"] == "ok" for r in table), path
        rows.update(r["key"] for r in table)
    return rows


def _exactly_once(out: Path, shards: Path, names: set[str] | None = None) -> None:
    """Every input key of the shards `names` (default all) in exactly one row; no temp or claim file left."""
    from t2i_recap.shards import iter_tar_samples

    tars = [p for p in sorted(shards.glob("*.tar")) if names is None or p.stem in names]
    wanted = Counter(s.key for p in tars for s in iter_tar_samples(p))
    assert sum(wanted.values()) == len(tars) * CAPTIONER_SHARD_SIZE
    rows = _rows_per_key(out)
    assert rows == wanted, f"missing {wanted - rows}, doubled {rows - wanted}"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp or claim files left behind"


def _writer_pid(path: Path) -> int:
    from t2i_recap.captioner.writer import read_info

    return read_info(path)["claim"]["pid"]


def _claim_holders(out: Path) -> dict[str, int]:
    """shard -> pid of the claims held now (a file caught mid-write is passed over)."""
    held = {}
    for path in (out / ".claims").glob("*.claim") if (out / ".claims").is_dir() else []:
        try:
            held[path.stem] = json.loads(path.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pass
    return held


def _watch(out: Path, act, stop: threading.Event) -> threading.Thread:
    """Call act(shard, pid) for each claim held by another process, in a thread, until `stop`."""
    def loop():
        while not stop.is_set():
            for shard, pid in _claim_holders(out).items():
                if pid != os.getpid():
                    act(shard, pid)
            time.sleep(0.005)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


class _WaitsForRay:
    """The real captioner, whose first batch waits until a Ray worker holds a claim on `out`: the
    accelerate run and the Ray run then certainly overlap."""

    def __init__(self, inner, out: Path) -> None:
        self.inner, self.out, self.waited = inner, out, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prepared, max_new_tokens=128):
        deadline = time.monotonic() + 600  # Ray workers start slowly on 2 busy cores
        while not self.waited and not any(p != os.getpid() for p in _claim_holders(self.out).values()):
            assert time.monotonic() < deadline, "no Ray worker claimed a shard"
            time.sleep(0.01)
        self.waited = True
        return self.inner.generate(prepared, max_new_tokens)


def test_ray_and_accelerate_on_one_folder_caption_each_shard_once_with_the_same_sidecars(
        ray_cluster, one_thread, captioner_shards, tiny_llava_dir, tmp_path, caplog):
    from t2i_recap.captioner.run import Dist, caption_run, load_backend
    from t2i_recap.captioner.writer import read_info

    # The accelerate path alone, for reference.
    ref = tmp_path / "accelerate"
    cfg_a = _cfg(captioner_shards, ref, tiny_llava_dir)
    backend = load_backend(cfg_a)
    assert caption_run(cfg_a, Dist(), backend)["shards_done"] == CAPTIONER_SHARDS

    # One folder, a Ray run of 2 workers and an accelerate run at once.
    out = tmp_path / "both"
    result = {}
    accel = threading.Thread(target=lambda: result.update(
        caption_run(_cfg(captioner_shards, out, tiny_llava_dir), Dist(), _WaitsForRay(backend, out))))
    accel.start()
    caplog.set_level(logging.INFO, logger="t2i_recap.captioner.ray_engine")
    summary = caption_run(_cfg(captioner_shards, out, tiny_llava_dir, engine="ray", workers=2))
    accel.join(240)
    assert not accel.is_alive() and not result["shards_failed"] and not summary["shards_failed"]
    _exactly_once(out, captioner_shards)
    by_ray = {p.stem for p in out.glob("*.parquet") if _writer_pid(p) != os.getpid()}
    assert summary["shards_done"] == len(by_ray) >= 1 and result["shards_done"] == CAPTIONER_SHARDS - len(by_ray) >= 1
    assert summary["shards_done"] + summary["shards_done_elsewhere"] == CAPTIONER_SHARDS
    assert summary["world_size"] == 2 and summary["retries"] == []
    assert {_writer_pid(out / f"{s}.parquet") for s in by_ray} <= {w["pid"] for w in summary["workers"]}
    assert summary["counts"]["ok"] == len(by_ray) * CAPTIONER_SHARD_SIZE
    progress = [r.getMessage() for r in caplog.records if "shards finished" in r.getMessage()]
    assert len(progress) == CAPTIONER_SHARDS and progress[-1].startswith(f"{CAPTIONER_SHARDS}/{CAPTIONER_SHARDS} ")
    assert all("images/s, ETA" in line for line in progress)

    # Each sidecar the Ray workers wrote equals the accelerate path's: rows, schema, provenance.
    for name in sorted(by_ray):
        mine, theirs = pq.read_table(out / f"{name}.parquet"), pq.read_table(ref / f"{name}.parquet")
        assert mine.schema.remove_metadata() == theirs.schema.remove_metadata()
        assert mine.to_pylist() == theirs.to_pylist()
        meta, want = read_info(out / f"{name}.parquet"), read_info(ref / f"{name}.parquet")
        assert meta.keys() == want.keys() and meta["engine"] == "ray" and want["engine"] == "accelerate"
        meta["counts"].pop("seconds"), want["counts"].pop("seconds")
        assert {k: v for k, v in meta.items() if k not in VOLATILE} == {k: v for k, v in want.items() if k not in VOLATILE}
        assert meta["claim"]["pid"] in {w["pid"] for w in summary["workers"]} and 0 <= meta["rank"] < 2


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_shard_retries_its_shard_elsewhere_and_bounds_the_retries(
        ray_cluster, captioner_shards, tiny_llava_dir, tmp_path):
    """ray_max_retries=1: the first shard claimed loses its worker once (retried on another worker,
    completes); the second loses its worker twice (reported failed, naming both deaths)."""
    from t2i_recap.captioner.run import caption_run

    out = tmp_path / "out"
    plan, killed = {}, {}  # shard -> kills wanted; pid killed -> its shard

    def kill(shard: str, pid: int) -> None:
        if pid in killed or (out / f"{shard}.parquet").exists():
            return  # already killed, or a claim read just before its worker released it
        if shard not in plan and len(plan) < 2:
            plan[shard] = 1 if not plan else 2
        if plan.get(shard, 0) > sum(s == shard for s in killed.values()):
            os.kill(pid, signal.SIGKILL)
            killed[pid] = shard

    stop = threading.Event()
    watcher = _watch(out, kill, stop)
    try:
        summary = caption_run(_cfg(captioner_shards, out, tiny_llava_dir, engine="ray", workers=2, ray_max_retries=1))
    finally:
        stop.set()
        watcher.join()
    (once, twice), = [sorted(plan, key=plan.get)]
    assert Counter(killed.values()) == {once: 1, twice: 2}
    assert [(r["shard"], r["attempt"]) for r in summary["retries"]] in ([(once, 1), (twice, 1)], [(twice, 1), (once, 1)])
    assert all("died" in r["reason"] for r in summary["retries"])
    failed, = summary["shards_failed"]
    assert failed["shard"] == twice and len(failed["worker_deaths"]) == 2 and "ray_max_retries=1" in failed["error"]
    assert summary["shards_done"] == CAPTIONER_SHARDS - 1 and not (out / f"{twice}.parquet").exists()
    assert _writer_pid(out / f"{once}.parquet") not in {p for p, s in killed.items() if s == once}  # by another worker
    _exactly_once(out, captioner_shards, {p.stem for p in captioner_shards.glob("*.tar")} - {twice})


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_every_worker_at_a_batch_boundary(ray_cluster, captioner_shards,
                                                                      tiny_llava_dir, tmp_path):
    """SIGTERM once a shard is finished and another is in hand: the run ends interrupted, the shard in
    hand leaves nothing visible, and a rerun does the rest."""
    from t2i_recap.captioner.run import caption_run

    out = tmp_path / "out"

    def term(shard: str, pid: int) -> None:
        if list(out.glob("*.parquet")) and not stop.is_set():
            stop.set()
            os.kill(os.getpid(), signal.SIGTERM)  # the driver is this process; its handler sets the stop flag

    stop = threading.Event()
    watcher = _watch(out, term, stop)
    cfg = _cfg(captioner_shards, out, tiny_llava_dir, engine="ray", workers=2)
    try:
        summary = caption_run(cfg)
    finally:
        stop.set()
        watcher.join()
    assert summary["interrupted"] == "SIGTERM" and not summary["shards_failed"]
    done = {p.stem for p in out.glob("*.parquet")}
    assert summary["shards_done"] == len(done) < CAPTIONER_SHARDS
    _exactly_once(out, captioner_shards, done)  # no temp file, no claim left by the stopped shard
    rerun = caption_run(cfg)
    assert rerun["shards_skipped_done"] == len(done) and rerun["shards_done"] == CAPTIONER_SHARDS - len(done)
    _exactly_once(out, captioner_shards)


def _env() -> dict:
    """This process's environment as it is now: ray.init put the cluster's auth mode (RAY_AUTH_MODE) in it."""
    return {**os.environ, **RAY_ENV, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(shards: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "t2i_recap.captioner", "--engine", "ray", "--workers", "2", "--input", str(shards),
            "--out", str(out), "--model", str(model), "--batch-size", "1", "--max-new-tokens", "48",
            "--dtype", "float32", *[f"--set=claims.{k}={v}" for k, v in CLAIMS.items()], *extra]


@pytest.mark.slow
def test_sigkill_of_the_driver_and_its_workers_then_rerun_gives_one_row_per_key(
        ray_cluster, captioner_shards, tiny_llava_dir, tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen(_cli(captioner_shards, out, tiny_llava_dir, "--ray-address", ray_cluster), env=_env(),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.monotonic() + 240, set()
    while not (list(out.glob("*.parquet")) and workers):  # a shard finished and a worker is mid-shard
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no shard finished"
        time.sleep(0.005)
        workers = set(_claim_holders(out).values())
    for pid in [driver.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a worker Ray ended with its driver already
            pass
    driver.communicate()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert 1 <= len(done_before) < CAPTIONER_SHARDS, "the run finished before it could be killed"

    rerun = subprocess.run(_cli(captioner_shards, out, tiny_llava_dir), env=_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=300)  # no --ray-address: starts its own local Ray instance
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "starting a local Ray instance" in rerun.stderr
    summary = json.loads(rerun.stdout[rerun.stdout.find("{"):])
    assert summary["shards_skipped_done"] == len(done_before)
    assert summary["shards_done"] + summary["shards_done_elsewhere"] == CAPTIONER_SHARDS - len(done_before)
    _exactly_once(out, captioner_shards)
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished shards were not redone



@pytest.mark.slow
def test_engine_benchmark_prints_one_table_with_equal_captions(tmp_path):
    """benchmarks/caption_engines.py at its smallest: both engines from a cold start, one table."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 't2i-recap[ray]'")
    out_json = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "caption_engines.py"), "--out", str(tmp_path / "b"),
                           "--device", "cpu", "--shards", "2", "--shard-size", "2", "--max-new-tokens", "4",
                           "--json", str(out_json)], env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| engine | workers |") and [r.split("|")[1].strip() for r in table[1:]] == ["accelerate", "ray"]
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["images"] for r in rows] == [4, 4] and all(r["same captions"] and r["images/s"] > 0 for r in rows)
