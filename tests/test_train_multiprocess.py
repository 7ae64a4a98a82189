"""Two CPU processes under accelerate train, checkpoint and resume.

`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two gloo processes
(torchrun underneath). `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x
(its CPU launcher needs MPI); the trainer reads N from the launcher and relaunches as N torchrun
processes, or refuses when N cannot be read. Both launches run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_train import train_config_dict, write_config

REPO = Path(__file__).resolve().parents[1]


def _launch(cfg_file: Path, *extra: str, flag: str = "--multi_gpu") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", flag, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "t2i_recap.train", "--config", str(cfg_file), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--multi_gpu", "--cpu"])
def test_two_processes_train_checkpoint_and_resume(tmp_path, train_assets, train_shards, flag):
    """`--cpu` is the issue's command: accelerate starts one process, which relaunches as two."""
    shards, side = train_shards
    run = tmp_path / "run"
    # global batch 4 = micro 1 x 2 processes x 2 accumulation steps
    cfg = train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 2, "batch_size": 4,
                            "micro_batch_size": 1}, checkpoint={"every_steps": 2}, data={"num_workers": 1})
    res = _launch(write_config(tmp_path / "c.yaml", cfg), flag=flag)
    assert res.returncode == 0, res.stderr[-4000:]
    assert ("relaunching as 2 CPU processes" in res.stderr) == (flag == "--cpu")
    state = json.loads((run / "checkpoints/step-00000002/state.json").read_text())
    assert state["world_size"] == 2 and [r["rank"] for r in state["ranks"]] == [0, 1]
    assert state["samples"] == 8  # 2 steps x global batch 4
    # each rank read its own shard (2 shards, 2 ranks): 4 records each, cursors are per rank
    assert [r["cursor"] for r in state["ranks"]] == [[0, 4], [0, 4]]
    assert state["ranks"][0]["rng"]["torch"] != state["ranks"][1]["rng"]["torch"]  # seed + rank

    cfg["trainer"]["max_steps"] = 3
    res = _launch(write_config(tmp_path / "c.yaml", cfg), "--resume", "latest", flag=flag)
    assert res.returncode == 0, res.stderr[-4000:]
    state = json.loads((run / "checkpoints/step-00000003/state.json").read_text())
    assert state["samples"] == 12 and [r["cursor"] for r in state["ranks"]] == [[0, 6], [0, 6]]


def test_single_process_cpu_launch_is_refused(monkeypatch):
    from t2i_recap.trainer import _cpu_processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` sets
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes N"):
        _cpu_processes()  # the parent here is pytest, not a launcher: N cannot be read
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _cpu_processes() is True
