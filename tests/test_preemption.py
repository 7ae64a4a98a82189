"""Preemption: SIGTERM (what SLURM sends) or SIGINT during training saves a checkpoint at the next
step boundary and exits with PREEMPTED_EXIT_CODE (75); `--resume auto` continues to the same weights
as an uninterrupted run, and starts fresh when there is no checkpoint yet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures_train import train_config_dict, write_config

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 30
pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cfg(train_assets, train_shards, run: Path) -> dict:
    shards, side = train_shards
    return train_config_dict(train_assets, shards, run, side, mixing={"p": 0.5},
                             trainer={"max_steps": MAX_STEPS}, checkpoint={"every_steps": 2, "keep": 20})


def _steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in d.glob("step-*") if (p / "state.json").is_file()) if d.is_dir() else []


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            start_new_session=True, **kw)


def _signal_after_first_checkpoint(proc: subprocess.Popen, run: Path, sig: int, *, to_group: bool = False):
    deadline = time.monotonic() + 300
    while not _steps(run):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _train_cli(cfg_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "t2i_recap.train", "--config", str(cfg_file), *extra]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, train_assets, train_shards):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    run = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): thread count changes float sums
    try:
        train(from_dict(TrainConfig, _cfg(train_assets, train_shards, run)))
    finally:
        torch.set_num_threads(threads)
    return run


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    for name in ("model", "ema", "optimizer"):
        x, y = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert x.keys() == y.keys()
        worst = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
        assert worst <= 1e-6, f"{name}: max abs difference {worst}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_and_resume_auto_matches_straight(tmp_path, train_assets, train_shards,
                                                                    straight_run, sig):
    from t2i_recap.trainer import PREEMPTED_EXIT_CODE

    run = tmp_path / "run"
    cfg_file = write_config(tmp_path / "c.yaml", _cfg(train_assets, train_shards, run))
    code, err = _signal_after_first_checkpoint(_start(_train_cli(cfg_file, "--resume", "auto")), run, sig)
    assert code == PREEMPTED_EXIT_CODE, err[-4000:]
    stopped = int(err.rsplit("at step ", 1)[1].split(";")[0])
    assert 2 <= stopped < MAX_STEPS, "the signal must land mid-run"
    assert _steps(run)[-1] == stopped  # a checkpoint of the very step it stopped at
    assert signal.Signals(sig).name in err
    assert not (run / "summary.json").exists()

    res = subprocess.run(_train_cli(cfg_file, "--resume", "auto"), capture_output=True, text=True, env=ENV,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped:08d}'}" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == MAX_STEPS
    _same_weights(run / f"checkpoints/step-{MAX_STEPS:08d}", straight_run / f"checkpoints/step-{MAX_STEPS:08d}")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, train_assets, train_shards, caplog):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    shards, side = train_shards
    run = tmp_path / "run"
    cfg = from_dict(TrainConfig, train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 2}))
    with caplog.at_level("INFO", logger="t2i_recap"):
        assert train(cfg, resume="auto")["step"] == 2
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    with pytest.raises(FileNotFoundError, match="--resume latest: no checkpoint"):
        train(from_dict(TrainConfig, train_config_dict(train_assets, shards, tmp_path / "other", side)),
              resume="latest")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank", "launcher"])
def test_two_processes_stop_together(tmp_path, train_assets, train_shards, target):
    """SIGTERM to one worker only, or to the whole launch (as SLURM does): both ranks stop after the
    same step and save one checkpoint of it."""
    from t2i_recap.trainer import PREEMPTED_EXIT_CODE

    shards, side = train_shards
    run = tmp_path / "run"
    cfg = train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 200, "batch_size": 4,
                            "micro_batch_size": 1}, checkpoint={"every_steps": 2, "keep": 50},
                            # a loader worker too: a group-wide SIGTERM reaches it as well (SLURM signals every process)
                            data={"num_workers": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_port", str(29600 + os.getpid() % 300), "-m", "t2i_recap.train",
           "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--resume", "auto"]
    proc = _start(cmd)
    if target == "rank":
        deadline = time.monotonic() + 300
        while not _steps(run):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.02)
        worker = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)], text=True).split()[-1])
        os.kill(worker, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    else:
        _, err = _signal_after_first_checkpoint(proc, run, signal.SIGTERM, to_group=True)
    assert err.count("checkpoint saved, continue with --resume auto") == 2, err[-4000:]
    if target == "rank":
        assert proc.returncode != 0
    stopped = {int(s.split(";")[0]) for s in err.split("at step ")[1:] if s.split(";")[0].isdigit()}
    assert len(stopped) == 1, stopped  # both ranks stopped after the same step
    step = stopped.pop()
    assert _steps(run)[-1] == step < 200
    state = json.loads((run / f"checkpoints/step-{step:08d}/state.json").read_text())
    assert state["world_size"] == 2 and [r["rank"] for r in state["ranks"]] == [0, 1]
    assert PREEMPTED_EXIT_CODE == 75
