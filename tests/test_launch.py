"""The process count `accelerate launch` promised, read the way accelerate reads it.

Config files here are written by the real `accelerate config default --config_file F` and then
edited, as a user would; t2i_recap.launch reads them through accelerate's own parser and loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from t2i_recap import launch

REPO = Path(__file__).resolve().parents[1]


def accelerate_config(path: Path, **edits) -> Path:
    """`accelerate config default --config_file path` (the function that command runs), then
    `edits` written into the file."""
    from accelerate.commands.config.default import write_basic_config

    assert write_basic_config(mixed_precision="no", save_location=str(path)) is not False
    data = yaml.safe_load(path.read_text())
    assert data["num_processes"] == 1  # what accelerate wrote, before the edit
    data.update(edits)
    path.write_text(yaml.safe_dump(data))
    return path


def _cmd(*launcher: str) -> list[str]:
    return ["accelerate", "launch", *launcher, "-m", "t2i_recap.train", "--config", "c.yaml"]


@pytest.fixture()
def two(tmp_path) -> Path:
    return accelerate_config(tmp_path / "two.yaml", num_processes=2)


def test_config_file_then_flag(tmp_path):
    one = accelerate_config(tmp_path / "one.yaml")
    assert launch.requested_processes(_cmd("--config_file", str(one), "--num_processes", "2")) == 2


def test_flag_then_config_file(tmp_path):
    one = accelerate_config(tmp_path / "one.yaml")
    assert launch.requested_processes(_cmd("--num_processes", "2", "--config_file", str(one))) == 2


def test_config_file_alone(two):
    assert launch.requested_processes(_cmd("--config_file", str(two))) == 2
    assert launch.requested_processes(_cmd("--cpu", "--config_file", str(two))) == 2
    assert launch.requested_processes(_cmd(f"--config_file={two}")) == 2


def test_flag_overrides_file(two):
    assert launch.requested_processes(_cmd("--config_file", str(two), "--num_processes", "3")) == 3
    assert launch.requested_processes(_cmd("--num_processes=1", "--config_file", str(two))) == 1


def test_relative_config_file_is_read_from_the_launchers_folder(two, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # this process's folder is not the launcher's
    assert launch.requested_processes(_cmd("--config_file", two.name), cwd=tmp_path) == 2


def test_launched_commands_flags_are_not_the_launchers(tmp_path):
    one = accelerate_config(tmp_path / "one.yaml")
    cmd = ["accelerate", "launch", "--config_file", str(one), "-m", "x", "--num_processes", "4"]
    assert launch.requested_processes(cmd) == 1


def test_missing_config_file_is_named_in_the_refusal(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match="nope.yaml"):
        launch.requested_processes(_cmd("--config_file", str(missing)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(launch, "_parent_cmdline", lambda: _cmd("--cpu", "--config_file", str(missing)))
    with pytest.raises(RuntimeError, match="nope.yaml"):
        launch.check_cpu_launch("t2i_recap.train")


@pytest.mark.slow
def test_two_process_training_from_a_config_file(tmp_path, train_assets, train_shards, two):
    """The reported launch: a config file holding num_processes: 2 (use_cpu: true, as `accelerate config
    default` writes on a machine without GPUs) and no --num_processes flag trains on two ranks."""
    from fixtures_train import train_config_dict, write_config

    shards, side = train_shards
    run = tmp_path / "run"
    cfg = train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 1, "batch_size": 2,
                            "micro_batch_size": 1}, checkpoint={"every_steps": 1}, data={"num_workers": 1})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", two.name,
           "-m", "t2i_recap.train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    state = json.loads((run / "checkpoints/step-00000001/state.json").read_text())
    assert state["world_size"] == 2 and [r["rank"] for r in state["ranks"]] == [0, 1]
