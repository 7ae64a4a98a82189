"""Scale-out: shards split over processes with no overlap and no gap, whatever was
finished before and whatever the world size; training with 2 processes matches 1 process at the
same global batch.

The real two-process captioning launch is tested in test_captioner_run.py::test_two_process_split
and the two-process train/checkpoint/resume in test_train_multiprocess.py; this file adds what they
do not: rank splits across restarts with a changed world size, the relaunch (or refusal) of the launch
that silently starts one process, and the 1-vs-2-process loss comparison, launched with the documented
docs/accelerate/cpu_two_processes.yaml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures_train import train_config_dict, write_config
from test_reliability_bad_input import EchoBackend

REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIG = REPO / "docs/accelerate/cpu_two_processes.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _rows(out: Path) -> Counter:
    return Counter(k for p in out.glob("*.parquet") for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())


def _input_keys(shards: Path) -> Counter:
    from t2i_recap.shards import iter_tar_samples

    return Counter(s.key for p in sorted(shards.glob("*.tar")) for s in iter_tar_samples(p))


@pytest.mark.parametrize("plan", [[(0, 2), (1, 2)], [(1, 3), (0, 2), (1, 2)], [(2, 4), (0, 1)], [(0, 3), (2, 3), (1, 3)]],
                         ids=["2-ranks", "3-then-2", "4-then-1", "3-ranks-any-order"])
def test_ranks_split_shards_with_no_overlap_and_no_gap(tmp_path, captioner_shards, plan):
    """Each (rank, world) run in turn, as ranks of a job or as restarts with another world size."""
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.captioner.writer import read_info

    out = tmp_path / "out"
    cfg = CaptionRunConfig(input=str(captioner_shards), out=str(out), model="echo", batch_size=2)
    for rank, world in plan:
        summary = caption_run(cfg, Dist(rank, world), EchoBackend())
        assert summary["shards_mine"] == len(range(rank, 4, world)) and not summary["shards_failed"]
    assert _rows(out) == _input_keys(captioner_shards)  # every key exactly once
    last_world = plan[-1][1]
    if len(plan) == last_world and all(w == last_world for _, w in plan):  # one job: shard i on rank i % world
        assert {p.stem: read_info(p)["rank"] for p in out.glob("*.parquet")} == {
            f"{i:05d}": i % last_world for i in range(4)}


def test_the_launch_that_starts_one_process_is_relaunched_or_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs ONE process (accelerate 1.x needs MPI for CPU jobs).
    The commands read N from the launcher's command line and become N torchrun processes (the real
    launches: test_captioner_run.py::test_two_process_split, test_train_multiprocess.py); when N cannot
    be read they refuse, naming the launch that works, instead of doing two processes' work in one."""
    from t2i_recap import launch

    for argv, n in [(["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "x"], 2),
                    ([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=3", "s.py"], 3),
                    (["accelerate", "launch", "--cpu", "-m", "x", "--num_processes", "4"], None),  # the script's flag
                    (["accelerate", "launch", "--cpu", "--num_processes", "two", "-m", "x"], None),
                    ([sys.executable, "-m", "pytest"], None)]:
        assert launch.requested_processes(argv) == n, argv
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert launch.lost_processes()
    monkeypatch.setattr(launch, "_parent_cmdline", lambda: [sys.executable, "-m", "pytest"])
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes N -m t2i_recap.captioner"):
        launch.check_cpu_launch("t2i_recap.captioner")
    # A relaunched process that finds itself lost again refuses instead of looping.
    monkeypatch.setattr(launch, "_parent_cmdline", lambda: ["accelerate", "launch", "--cpu", "--num_processes", "2"])
    monkeypatch.setenv(launch.RELAUNCHED, "1")
    with pytest.raises(RuntimeError, match="could not be read|torchrun"):
        launch.check_cpu_launch("t2i_recap.captioner")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / --multi_gpu: a sound launch
    assert not launch.lost_processes()
    launch.check_cpu_launch("t2i_recap.captioner")


def _losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, train_assets, train_shards, one_thread):
    """Global batch 8: 2 processes x micro 2 x 2 accumulation vs 1 process x micro 2 x 4 accumulation.

    The two runs see the same data distribution but not the same samples in the same order (each
    rank reads its own shards, noise is seeded per rank), so the loss curves agree statistically,
    not bit for bit: the mean loss over the run within 10%, and both fall.
    """
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    shards, side = train_shards
    sections = dict(trainer={"max_steps": 12, "batch_size": 8, "micro_batch_size": 2, "log_every": 1},
                    checkpoint={"every_steps": 12}, mixing={"p": 0.3}, data={"num_workers": 0})
    one = tmp_path / "one"
    single = train(from_dict(TrainConfig, train_config_dict(train_assets, shards, one, side, **sections)))
    two = tmp_path / "two"
    cfg_file = write_config(tmp_path / "two.yaml", train_config_dict(train_assets, shards, two, side, **sections))
    # the documented launcher file (docs/SCALING.md), not flags
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG),
           "-m", "t2i_recap.train", "--config", str(cfg_file)]
    res = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12 and single["samples"] == 96
    mean_a, mean_b = sum(a) / 12, sum(b) / 12
    print(f"mean loss: 1 process {mean_a:.4f}, 2 processes {mean_b:.4f}; last 4 steps {a[-4:]} vs {b[-4:]}")
    assert abs(mean_a - mean_b) <= 0.10 * mean_a
    for curve in (a, b):  # both learn
        assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4
