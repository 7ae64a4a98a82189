"""Kill tests: SIGKILL at random points, then rerun; nothing lost, nothing doubled.

Captioning: 10 trials, each SIGKILLs a captioning run at a random moment (from before the first
batch to the end of the run), checks that every `*.parquet` visible under a final name is a
complete sidecar, reruns, and checks that every input key is in exactly one output row and no
temp file is left. One more trial kills the real CLI (`python -m t2i_recap.captioner`).

Training: the run is SIGKILLed mid-step (gradients accumulated, not applied) and mid-checkpoint-
write (a file of the new checkpoint half written); `--resume latest` then ends with the same
weights, EMA and optimizer state as an uninterrupted run, and the previous checkpoint survives.

The killed runs are forked from the test process (models already loaded), so a trial costs a
fraction of a second instead of a fresh interpreter; the kill is a real SIGKILL either way.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from fixtures_captioner import CAPTIONER_SHARD_SIZE, CAPTIONER_SHARDS
from fixtures_train import train_config_dict

REPO = Path(__file__).resolve().parents[1]
TRIALS = 10
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: steadier on one thread


def run_forked(fn, *, kill_after: float | None = None, timeout: float = 120.0) -> str:
    """Run `fn()` in a forked child; SIGKILL it after `kill_after` seconds. Returns how it ended."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    start = time.monotonic()
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        elapsed = time.monotonic() - start
        if kill_after is not None and not killed and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)
            killed = True
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child did not finish in {timeout} s")
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    code = os.WEXITSTATUS(status)
    assert code == 0, f"forked child failed with exit code {code} (traceback on stderr)"
    return "finished"


def suicide() -> None:
    """SIGKILL this process: no cleanup handler, no finally block, no flush runs."""
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def caption_backend(tiny_llava_dir):
    from t2i_recap.captioner.backend import TransformersBackend

    return TransformersBackend(str(tiny_llava_dir), device="cpu", dtype="float32")


def _caption_cfg(shards: Path, out: Path, model: Path):
    from t2i_recap.captioner.run import CaptionRunConfig

    return CaptionRunConfig(input=str(shards), out=str(out), model=str(model), batch_size=2, max_new_tokens=6,
                            prefetch_batches=1)


def input_keys(shards: Path) -> Counter:
    from t2i_recap.shards import iter_tar_samples

    return Counter(s.key for p in sorted(shards.glob("*.tar")) for s in iter_tar_samples(p))


def check_visible_sidecars(out: Path, shards: Path) -> int:
    """Every sidecar under a final name is complete: readable, ours, one row per sample of its shard."""
    from t2i_recap.captioner.writer import read_info
    from t2i_recap.shards import iter_tar_samples

    finals = sorted(out.glob("*.parquet")) if out.exists() else []
    for path in finals:
        info = read_info(path)
        assert info is not None and info["shard"]["name"] == path.stem, path
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        assert keys == [s.key for s in iter_tar_samples(shards / f"{path.stem}.tar")], f"{path} is partial"
    return len(finals)


def check_exactly_once(out: Path, shards: Path) -> None:
    rows = Counter()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "status"]).to_pylist()
        assert all(r["status"] == "ok" for r in table), path
        rows.update(r["key"] for r in table)
    wanted = input_keys(shards)
    assert sum(wanted.values()) == CAPTIONER_SHARDS * CAPTIONER_SHARD_SIZE
    assert rows == wanted, f"missing {wanted - rows}, doubled {rows - wanted}"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_caption_sigkill_at_random_points_then_rerun(tmp_path, captioner_shards, tiny_llava_dir, caption_backend):
    from t2i_recap.captioner.run import Dist, caption_run

    def run(out: Path):
        return lambda: caption_run(_caption_cfg(captioner_shards, out, tiny_llava_dir), Dist(), caption_backend)

    started = time.monotonic()
    assert run_forked(run(tmp_path / "timing")) == "finished"
    full = time.monotonic() - started
    rng = random.Random(8)
    seen_at_kill = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        # anywhere from before the first batch to the end: early, mid-shard and mid-write kills
        outcome = run_forked(run(out), kill_after=rng.uniform(0.0, full))
        seen_at_kill.append((outcome, check_visible_sidecars(out, captioner_shards)))
        summary = caption_run(_caption_cfg(captioner_shards, out, tiny_llava_dir), Dist(), caption_backend)
        assert summary["shards_skipped_done"] == seen_at_kill[-1][1] and not summary["shards_failed"]
        check_exactly_once(out, captioner_shards)
    print(f"caption kill trials (outcome, sidecars done at the kill): {seen_at_kill}; full run {full:.2f} s")
    assert sum(o == "killed" for o, _ in seen_at_kill) >= TRIALS // 2  # the kills did land mid-run


def test_caption_killed_inside_the_sidecar_write(tmp_path, captioner_shards, tiny_llava_dir, caption_backend,
                                                 monkeypatch):
    """The worst moment: the parquet bytes are half on disk. Only a hidden temp file may remain."""
    from t2i_recap.captioner import writer
    from t2i_recap.captioner.run import Dist, caption_run

    real_write = pq.write_table
    calls = []

    def write_then_die(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:  # the second shard's sidecar: write half of it, then die
            real_write(table.slice(0, 2), where, **kw)
            suicide()
        real_write(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", write_then_die)
    out = tmp_path / "out"
    cfg = _caption_cfg(captioner_shards, out, tiny_llava_dir)
    assert run_forked(lambda: caption_run(cfg, Dist(), caption_backend)) == "killed"
    monkeypatch.setattr(writer.pq, "write_table", real_write)
    assert check_visible_sidecars(out, captioner_shards) == 1
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "the half-written temp file should be there"
    caption_run(cfg, Dist(), caption_backend)
    check_exactly_once(out, captioner_shards)


def test_caption_cli_sigkill_then_rerun(tmp_path, captioner_shards, tiny_llava_dir):
    """The real CLI in a fresh interpreter, killed once its first sidecar is on disk."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "t2i_recap.captioner", "--input", str(captioner_shards), "--out", str(out),
           "--model", str(tiny_llava_dir), "--batch-size", "1", "--max-new-tokens", "24", "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and not list(out.glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the CLI ended before the kill: {stderr[-2000:]}"
    done = check_visible_sidecars(out, captioner_shards)
    assert 1 <= done < CAPTIONER_SHARDS
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'"shards_skipped_done": {done}' in res.stdout
    check_exactly_once(out, captioner_shards)


# ---------------------------------------------------------------- training


def _train_cfg(train_assets, train_shards, run: Path, *, keep: int, max_steps: int = 8):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig

    shards, side = train_shards
    # 8 steps x 4 samples over 24 samples: the resumed part crosses an epoch boundary
    return from_dict(TrainConfig, train_config_dict(train_assets, shards, run, side, mixing={"p": 0.5},
                                                    trainer={"max_steps": max_steps},
                                                    checkpoint={"every_steps": 2, "keep": keep}))


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def _same_checkpoint(a: Path, b: Path, atol: float = 1e-6) -> None:
    for name in ("model", "ema", "optimizer"):
        x, y = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert x.keys() == y.keys(), name
        worst = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
        assert worst <= atol, f"{name}: max abs difference {worst} between {a} and {b}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, train_assets, train_shards):
    """The uninterrupted reference, every checkpoint kept."""
    from t2i_recap.trainer import train

    run = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed and resumed runs: thread count changes float sums
    try:
        train(_train_cfg(train_assets, train_shards, run, keep=10))
    finally:
        torch.set_num_threads(threads)
    return run


def test_train_killed_mid_step_resumes_to_the_same_weights(tmp_path, train_assets, train_shards, straight_run,
                                                           monkeypatch):
    from t2i_recap import trainer as trainer_mod
    from t2i_recap.trainer import Trainer, train

    real = Trainer._micro_step
    calls = []

    def micro_step_then_die(self, batch, micro):
        out = real(self, batch, micro)
        calls.append(self.step)
        # step 5 (0-based), second micro-batch: the first micro-batch's gradients are accumulated
        if self.step == 5 and calls.count(5) == 2:
            suicide()
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "_micro_step", micro_step_then_die)
    run = tmp_path / "run"
    assert run_forked(lambda: train(_train_cfg(train_assets, train_shards, run, keep=2))) == "killed"
    monkeypatch.setattr(trainer_mod.Trainer, "_micro_step", real)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    summary = train(_train_cfg(train_assets, train_shards, run, keep=2), resume="latest")
    assert summary["step"] == 8 and summary["samples"] == 32
    _same_checkpoint(_ckpt(straight_run, 8), _ckpt(run, 8))


@pytest.mark.parametrize("die_in", ["model.safetensors", "optimizer.safetensors", "state.json", "rotate"])
def test_train_killed_mid_checkpoint_write_keeps_the_previous_one(tmp_path, train_assets, train_shards,
                                                                  straight_run, monkeypatch, die_in):
    from t2i_recap import checkpoint as ckpt_mod
    from t2i_recap.checkpoint import Checkpointer
    from t2i_recap.trainer import train

    real_save_file, real_rotate = ckpt_mod.save_file, Checkpointer._rotate
    real_write_text = Path.write_text

    def save_file_then_die(tensors, filename, *a, **kw):
        real_save_file(tensors, filename, *a, **kw)
        if "step-00000006" in filename and filename.endswith(die_in):
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # and a torn file on top
            suicide()

    def write_text_then_die(self, text, *a, **kw):
        if die_in == "state.json" and self.name == "state.json" and "step-00000006" in str(self.parent):
            real_write_text(self, text[: len(text) // 2], *a, **kw)
            suicide()
        return real_write_text(self, text, *a, **kw)

    def rotate_then_die(self):
        if any(s == 6 for s, _ in self.all()):
            suicide()
        real_rotate(self)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file_then_die)
    monkeypatch.setattr(Path, "write_text", write_text_then_die)
    if die_in == "rotate":
        monkeypatch.setattr(Checkpointer, "_rotate", rotate_then_die)
    run = tmp_path / "run"
    assert run_forked(lambda: train(_train_cfg(train_assets, train_shards, run, keep=2))) == "killed"
    monkeypatch.undo()

    ckpts = Checkpointer(run, _train_cfg(train_assets, train_shards, run, keep=2).checkpoint)
    found = [s for s, _ in ckpts.all()]
    if die_in == "rotate":  # the new checkpoint was complete; the old ones had not been rotated yet
        assert found == [2, 4, 6]
    else:  # the half-written step 6 is invisible; the two previous checkpoints are intact
        assert found == [2, 4]
        assert ckpts.resolve("latest") == _ckpt(run, 4)
        _same_checkpoint(_ckpt(straight_run, 4), _ckpt(run, 4), atol=0.0)
    summary = train(_train_cfg(train_assets, train_shards, run, keep=2), resume="latest")
    assert summary["step"] == 8
    _same_checkpoint(_ckpt(straight_run, 8), _ckpt(run, 8))
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert not leftovers, f"stale partial checkpoints left on disk: {leftovers}"
