"""Per-shard claims: overlapping `caption run` processes never caption a shard twice; a dead
process's claim is taken over; SIGTERM stops cleanly with a distinct exit code.

Unit tests drive `t2i_recap.claims` directly (exclusive create, live and dead owners, the race of
takers over one stale claim, the heartbeat); the rest run the real CLI in fresh interpreters on
one output folder and count rows per key.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
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
FAST = {"heartbeat_s": 0.1, "stale_s": 0.5, "poll_s": 0.05}


def _claims(root: Path, node: str | None = None, **cfg):
    """A Claims object; `node` makes it look like a process on another host (judged by heartbeat alone)."""
    from t2i_recap.claims import ClaimConfig, Claims

    claims = Claims(root, ClaimConfig(**{**FAST, **cfg}))
    if node is not None:
        claims.owner = dataclasses.replace(claims.owner, node=node, host=node)
    return claims


def _token(path: Path) -> str:
    return json.loads(path.read_text())["token"]


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


# ---------------------------------------------------------------- unit: claims


def test_exclusive_create_then_release(tmp_path):
    a, b = _claims(tmp_path), _claims(tmp_path)
    held = a.try_acquire("00000")
    assert held is not None and _token(held.path) == a.owner.token
    assert b.try_acquire("00000") is None  # same host, owner alive: respected
    held.release()
    assert not held.path.exists()
    again = b.try_acquire("00000")
    assert again is not None and _token(again.path) == b.owner.token
    again.release()


def test_live_claim_of_another_host_is_respected_and_stale_one_taken_over(tmp_path):
    elsewhere = _claims(tmp_path, node="elsewhere")
    theirs = elsewhere.try_acquire("00003")
    theirs._stop.set()  # its host stops beating (the process there froze or the host died)
    theirs._thread.join()
    me = _claims(tmp_path, stale_s=5.0)
    assert me.try_acquire("00003") is None  # fresh: its pid means nothing here, only the heartbeat counts
    _age(theirs.path, 6.0)
    mine = me.try_acquire("00003")
    assert mine is not None and _token(mine.path) == me.owner.token
    assert not theirs.still_mine()
    with pytest.raises(Exception, match="held by another process"):
        theirs.check()
    mine.release()
    assert not list(me.dir.glob(".*")), "takeover left a private file behind"


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    from t2i_recap.claims import Owner

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is gone
    dead = dataclasses.replace(Owner.here(), pid=child.pid, token="dead")
    me = _claims(tmp_path, stale_s=3600.0)
    me.dir.mkdir()
    me.path("00001").write_text(json.dumps(dataclasses.asdict(dead)))
    got = me.try_acquire("00001")
    assert got is not None and _token(got.path) == me.owner.token
    got.release()


def _race_taker(root: str, barrier, results, done) -> None:
    claims = _claims(Path(root), stale_s=5.0)
    barrier.wait()
    claim = claims.try_acquire("00000")
    results.put((os.getpid(), claim.owner.token if claim else None))
    done.wait(30)  # hold the claim until every taker has reported, so no late taker finds it free
    if claim:
        claim.release()


@pytest.mark.parametrize("takers", [2, 6])
def test_race_of_takers_over_a_stale_claim_has_exactly_one_winner(tmp_path, takers):
    ctx = multiprocessing.get_context("fork")
    wins = []
    for trial in range(8):
        root = tmp_path / f"t{trial}"
        old = _claims(root, node="elsewhere").try_acquire("00000")
        old._stop.set()
        old._thread.join()
        _age(old.path, 60.0)  # dead by its heartbeat
        barrier, results, done = ctx.Barrier(takers), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_race_taker, args=(str(root), barrier, results, done)) for _ in range(takers)]
        for p in procs:
            p.start()
        got = [results.get(timeout=30) for _ in procs]
        winners = [tok for _, tok in got if tok]
        assert len(winners) == 1, f"trial {trial}: {len(winners)} takers won: {got}"
        assert _token(old.path) == winners[0]
        done.set()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        wins.append(winners[0])
        assert not [p.name for p in (root / ".claims").iterdir() if p.name.endswith(".takeover")]
    assert len(set(wins)) == 8


def test_a_late_taker_leaves_the_winners_claim_alone(tmp_path):
    """The race step by step: B judged the claim dead, A took it over first; B then gets the takeover
    lock (A has dropped it) but finds the claim is no longer the dead one, and leaves A's claim alone."""
    from t2i_recap.claims import _inspect

    old = _claims(tmp_path, node="elsewhere").try_acquire("00000")
    old._stop.set()
    old._thread.join()
    _age(old.path, 60.0)
    a, b = _claims(tmp_path, stale_s=5.0), _claims(tmp_path, stale_s=5.0)
    seen_by_b = _inspect(old.path)
    assert b.dead_because(seen_by_b) is not None
    won = a.try_acquire("00000")
    assert won is not None
    assert b._take_over(old.path, seen_by_b, replace=True) is False
    assert _token(old.path) == a.owner.token and won.still_mine()
    won.release()


def test_heartbeat_keeps_a_claim_alive_past_the_stale_timeout_and_sees_a_loss(tmp_path):
    holder = _claims(tmp_path)
    claim = holder.try_acquire("00002")
    other = _claims(tmp_path, node="elsewhere")
    time.sleep(1.2)  # more than twice stale_s (0.5 s)
    assert other.try_acquire("00002") is None
    assert time.time() - claim.path.stat().st_mtime < 0.5
    claim._stop.set()  # the holder freezes: no more heartbeats
    claim._thread.join()
    time.sleep(0.7)
    taken = other.try_acquire("00002")
    assert taken is not None
    with pytest.raises(Exception, match="held by another process"):
        claim.check()
    claim.release()  # a lost claim's release leaves the taker's file alone
    assert _token(taken.path) == other.owner.token
    taken.release()


def test_heartbeat_notices_a_takeover_while_the_holder_runs(tmp_path):
    holder = _claims(tmp_path)
    claim = holder.try_acquire("00004")
    _age(claim.path, 60.0)
    assert _claims(tmp_path, node="elsewhere").try_acquire("00004") is not None  # taken between two beats
    assert claim.lost.wait(2.0), "the heartbeat did not notice the takeover"
    claim.release()


def test_each_skips_finished_waits_for_live_owners_and_takes_over_dead_ones(tmp_path):
    finished = {"b"}
    other = _claims(tmp_path, node="elsewhere")
    held = other.try_acquire("c")
    me = _claims(tmp_path)
    stop_beating = threading.Timer(0.3, held._stop.set)  # that host dies after 0.3 s
    stop_beating.start()
    order = []
    for name, claim in me.each(["a", "b", "c", "d"], str, finished.__contains__):
        assert claim.still_mine()
        order.append(name)
        finished.add(name)
    assert order == ["a", "d", "c"] and me.finished_elsewhere == ["b"]
    me.prune()
    assert not me.dir.exists(), "the claims folder should be gone once every claim is released"


def test_each_asks_again_once_claimed_so_a_shard_finished_meanwhile_is_not_redone(tmp_path):
    """The race that a claim alone does not close: another process finishes the shard and releases its
    claim between this process's first look and its claim."""
    asked = Counter()

    def is_done(name: str) -> bool:
        asked[name] += 1
        return asked[name] > 1  # unfinished at the first look, finished by the time the claim is won

    assert list(_claims(tmp_path).each(["a"], str, is_done)) == []
    assert asked["a"] == 2


def test_each_stops_waiting_when_asked(tmp_path):
    _claims(tmp_path, node="elsewhere").try_acquire("x")  # live and beating
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert list(_claims(tmp_path).each(["x"], str, lambda _: False, stop)) == []
    assert time.monotonic() - started < 5


def test_the_folder_vanishing_under_a_prune_or_a_takeover_is_not_an_error(tmp_path, monkeypatch):
    """The last other owner removes the empty claims folder at any moment: between a look at the
    folder and its listing (prune), or between judging a claim dead and taking its lock."""
    import t2i_recap.claims as claims_mod

    a = _claims(tmp_path)
    held = a.try_acquire("00000")
    held.release()
    a.prune()
    assert not a.dir.exists()
    a.prune()  # nothing left: a no-op, not FileNotFoundError
    real_listdir = os.listdir

    def listdir_after_removal(path):
        if Path(path) == a.dir:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_listdir(path)

    a.dir.mkdir()
    monkeypatch.setattr(claims_mod.os, "listdir", listdir_after_removal)
    a.prune()  # the folder listed as gone: a no-op (prune then removes the real, empty folder)
    monkeypatch.undo()
    assert not a.dir.exists()
    assert a._lock(a.dir / ".x.claim.1-2.takeover") is False


def test_bad_claim_settings_are_refused():
    from t2i_recap.claims import ClaimConfig

    with pytest.raises(ValueError, match="stale_s"):
        ClaimConfig(heartbeat_s=10, stale_s=15)
    with pytest.raises(ValueError, match="heartbeat_s"):
        ClaimConfig(heartbeat_s=0)
    assert ClaimConfig(heartbeat_s=3).stale_s == 30


# ---------------------------------------------------------------- the real CLI


def _cmd(shards: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "t2i_recap.captioner", "--input", str(shards), "--out", str(out), "--model",
            str(model), "--batch-size", "1", "--max-new-tokens", "48", "--dtype", "float32",
            "--set", "claims.heartbeat_s=0.2", "--set", "claims.stale_s=2", "--set", "claims.poll_s=0.1"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict | None, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    start = stdout.find("{")
    return proc.returncode, json.loads(stdout[start:]) if start >= 0 else None, stderr


def _rows_per_key(out: Path) -> Counter:
    rows = Counter()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "status"]).to_pylist()
        assert all(r["status"] == "ok" for r in table), path
        rows.update(r["key"] for r in table)
    return rows


def _input_keys(shards: Path) -> Counter:
    from t2i_recap.shards import iter_tar_samples

    return Counter(s.key for p in sorted(shards.glob("*.tar")) for s in iter_tar_samples(p))


def _owners(out: Path) -> dict[str, int]:
    from t2i_recap.captioner.writer import read_info

    return {p.stem: read_info(p)["claim"]["pid"] for p in sorted(out.glob("*.parquet"))}


def _exactly_once(out: Path, shards: Path) -> None:
    wanted = _input_keys(shards)
    assert sum(wanted.values()) == CAPTIONER_SHARDS * CAPTIONER_SHARD_SIZE
    rows = _rows_per_key(out)
    assert rows == wanted, f"missing {wanted - rows}, doubled {rows - wanted}"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp or claim files left behind"


def _wait_for(cond, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
def test_two_cli_runs_on_one_folder_caption_every_shard_once(tmp_path, captioner_shards, tiny_llava_dir):
    out = tmp_path / "out"
    procs = [_start(_cmd(captioner_shards, out, tiny_llava_dir)) for _ in range(2)]
    results = [_finish(p) for p in procs]
    for code, summary, stderr in results:
        assert code == 0 and summary is not None, stderr[-3000:]
    _exactly_once(out, captioner_shards)
    owners = _owners(out)
    done = {summary["claim_owner"]["pid"]: summary["shards_done"] for _, summary, _ in results}
    # no shard captioned twice: the shards each process wrote add up to the shard count, and each
    # sidecar names the one process that wrote it
    assert sum(done.values()) == CAPTIONER_SHARDS, results
    assert Counter(owners.values()) == {pid: n for pid, n in done.items() if n}
    assert all(s["shards_done"] + s["shards_done_elsewhere"] == CAPTIONER_SHARDS for _, s, _ in results)
    print(f"shards per process: {done}")


@pytest.mark.slow
def test_sigkill_of_one_run_its_shard_is_taken_over_by_the_other(tmp_path, captioner_shards, tiny_llava_dir):
    out = tmp_path / "out"
    victim = _start(_cmd(captioner_shards, out, tiny_llava_dir))

    def victim_holds_a_claim() -> bool:
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        for path in (out / ".claims").glob("*.claim") if (out / ".claims").is_dir() else []:
            try:
                return json.loads(path.read_text())["pid"] == victim.pid
            except (OSError, ValueError):
                pass
        return False

    _wait_for(victim_holds_a_claim)
    time.sleep(0.3)  # into the shard
    survivor = _start(_cmd(captioner_shards, out, tiny_llava_dir))
    victim.send_signal(signal.SIGKILL)
    victim.communicate()  # reaped, as a process supervisor would
    code, summary, stderr = _finish(survivor)
    assert code == 0, stderr[-3000:]
    _exactly_once(out, captioner_shards)
    assert summary["shards_done"] + summary["shards_done_elsewhere"] == CAPTIONER_SHARDS
    assert "took over the claim" in stderr and f"'pid': {victim.pid}" in stderr


def test_a_shard_held_by_a_silent_host_is_done_after_the_stale_timeout(tmp_path, captioner_shards):
    """In process: the stale-timeout path of a real run (the holder is on another host, so only its
    heartbeat counts)."""
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.claims import ClaimConfig

    from test_reliability_bad_input import EchoBackend

    out = tmp_path / "out"
    ghost = _claims(out, node="elsewhere").try_acquire("00001")
    ghost._stop.set()  # that host died just now: its claim is fresh
    ghost._thread.join()
    cfg = CaptionRunConfig(input=str(captioner_shards), out=str(out), model="echo", batch_size=2,
                           claims=ClaimConfig(heartbeat_s=0.2, stale_s=1.5, poll_s=0.1))
    started = time.monotonic()
    summary = caption_run(cfg, Dist(), EchoBackend())
    assert summary["shards_done"] == CAPTIONER_SHARDS and not summary["shards_failed"]
    assert time.monotonic() - started >= 1.0  # it did wait for the timeout rather than barge in
    _exactly_once(out, captioner_shards)


def test_a_run_whose_claim_is_taken_over_mid_shard_drops_that_shard(tmp_path, captioner_shards):
    """This process stalled past the stale timeout and another took its claim: it must not write the shard."""
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.claims import Owner

    from test_reliability_bad_input import EchoBackend

    out = tmp_path / "out"
    claim = out / ".claims" / "00001.claim"
    taker = dataclasses.replace(Owner.here(), node="elsewhere", host="elsewhere", token="taker")

    class StolenMidShard(EchoBackend):
        def caption(self, images, prompts, max_new_tokens=128, **kw):
            if claim.exists() and _token(claim) != "taker":  # the taker replaces the claim file atomically
                tmp = claim.with_name("steal.tmp")
                tmp.write_text(json.dumps(dataclasses.asdict(taker)))
                os.replace(tmp, claim)
            return super().caption(images, prompts, max_new_tokens, **kw)

    cfg = CaptionRunConfig(input=str(captioner_shards), out=str(out), model="echo", batch_size=2)
    summary = caption_run(cfg, Dist(), StolenMidShard())
    assert [x["shard"] for x in summary["shards_lost"]] == ["00001"] and summary["shards_done"] == 3
    assert sorted(p.stem for p in out.glob("*.parquet")) == ["00000", "00002", "00003"]
    assert _token(claim) == "taker", "the taker's claim must survive the loser's release and prune"


@pytest.mark.slow
def test_sigterm_stops_cleanly_then_the_rerun_completes(tmp_path, captioner_shards, tiny_llava_dir):
    from t2i_recap.captioner.writer import read_info
    from t2i_recap.shards import iter_tar_samples

    out = tmp_path / "out"
    proc = _start(_cmd(captioner_shards, out, tiny_llava_dir))
    _wait_for(lambda: proc.poll() is None and list(out.glob("*.parquet")))
    time.sleep(0.3)  # into the next shard
    proc.send_signal(signal.SIGTERM)
    code, summary, stderr = _finish(proc)
    assert code == 143, f"exit code {code}: {stderr[-3000:]}"
    assert summary["interrupted"] == "SIGTERM" and "stopping at the next batch boundary" in stderr
    finished = sorted(out.glob("*.parquet"))
    assert 1 <= len(finished) < CAPTIONER_SHARDS and summary["shards_done"] == len(finished)
    for path in finished:  # every visible sidecar complete, nothing half-visible
        assert read_info(path)["shard"]["name"] == path.stem
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        assert keys == [s.key for s in iter_tar_samples(captioner_shards / f"{path.stem}.tar")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp file or claim left after SIGTERM"
    res = subprocess.run(_cmd(captioner_shards, out, tiny_llava_dir), env=ENV, cwd=REPO, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'"shards_skipped_done": {len(finished)}' in res.stdout
    _exactly_once(out, captioner_shards)


@pytest.mark.slow
def test_two_prepare_runs_on_one_cache_build_every_shard_once(tmp_path, train_assets, train_shards):
    from fixtures_train import train_config_dict, write_config

    shards, side = train_shards
    cache_dir = tmp_path / "cache"
    cfg = write_config(tmp_path / "train.yaml", train_config_dict(train_assets, shards, tmp_path / "run", side,
                                                                 features={"cache_dir": str(cache_dir)}))
    cmd = [sys.executable, "-m", "t2i_recap.prepare", "--config", str(cfg), "--claim-heartbeat-s", "0.2"]
    procs = [_start(cmd) for _ in range(2)]
    summaries = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    n = len(list(shards.glob("*.tar")))
    assert sum(s["built"] for s in summaries) == n, summaries  # each shard built by exactly one of them
    assert all(s["built"] + s["fresh"] == n for s in summaries), summaries
    assert sorted(p.name for p in cache_dir.glob("*.safetensors")) == sorted(
        [f"{p.stem}.safetensors" for p in shards.glob("*.tar")] + ["empty.safetensors"])
    assert not (cache_dir / ".claims").exists()
    print(f"prepare: shards built per process {[s['built'] for s in summaries]}")
