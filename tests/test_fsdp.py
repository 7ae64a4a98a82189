"""The DiT trainer under accelerate's FSDP2, on 2 CPU processes with gloo.

accelerate allows FSDP only on accelerators; tests/fsdp_cpu_harness.py lifts that one gate and runs
the real trainer, started by `accelerate launch --config_file docs/accelerate/fsdp_dit_xl.yaml` (the
documented config, with single-machine overrides). Every FSDP run here fails unless its parameters
and its EMA really are DTensor shards, each rank holding about half of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from fixtures_train import train_config_dict, write_config
from test_reliability_scaleout import _losses
from test_train_loop import _assert_close, _tensors

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests/fsdp_cpu_harness.py"
FSDP_CONFIG = REPO / "docs/accelerate/fsdp_dit_xl.yaml"
DDP_CONFIG = REPO / "docs/accelerate/cpu_two_processes.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, name: str, cfg: dict, *extra: str, launch_config: Path = FSDP_CONFIG) -> list[dict]:
    """Two processes through accelerate's launcher and the harness; returns each rank's report."""
    report = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
           "--num_machines", "1", "--num_processes", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           str(HARNESS), "--config", str(write_config(tmp_path / f"{name}.yaml", cfg)), "--report", str(report), *extra]
    res = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads(Path(f"{report}.rank{rank}").read_text()) for rank in range(2)]


def _assert_sharded(reports: list[dict]) -> None:
    for r in reports:
        assert r["distributed_type"] == "FSDP" and r["is_fsdp2"] and r["world"] == 2, r
        assert r["dtensor_params"] == r["params"] == r["ema_dtensors"] > 0, r
        assert r["local_numel"] < 0.6 * r["global_numel"], r  # each rank holds about half


def _cfg(train_assets, train_shards, run: Path, **sections) -> dict:
    shards, side = train_shards
    return train_config_dict(train_assets, shards, run, side, **sections)


def test_fsdp_trains_saves_validates_and_its_checkpoint_loads_in_one_process(tmp_path, train_assets, train_shards):
    """Global batch 4 = micro 1 x 2 processes x 2 accumulation steps (FSDP2's no-sync path)."""
    from t2i_recap.config import from_dict, load_config
    from t2i_recap.export import export
    from t2i_recap.generation import generate_from_settings, image_grid, load_pipeline
    from t2i_recap.models import build_model
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    run = tmp_path / "run"
    cfg = _cfg(train_assets, train_shards, run, trainer={"max_steps": 2, "batch_size": 4, "micro_batch_size": 1},
               validation={"every_steps": 0, "prompts": ["a red circle", "two blue squares"], "seeds": [0, 1]})
    _assert_sharded(_launch(tmp_path, "fsdp", cfg))
    ckpt = run / "checkpoints/step-00000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 8

    # Full tensors, keyed as the unsharded model's state dict (what one process writes).
    plain = build_model(load_config(TrainConfig, run / "config.yaml").model, latent_channels=4, latent_size=8,
                        caption_channels=32)
    expected = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in load_file(str(ckpt / "model.safetensors")).items()} == expected
    params = dict(plain.named_parameters())
    assert {k: tuple(v.shape) for k, v in load_file(str(ckpt / "ema.safetensors")).items()} == {
        k: tuple(p.shape) for k, p in params.items()}
    # torch's integer-indexed optimizer state: index i is the model's i-th parameter
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    shapes = [tuple(p.shape) for p in plain.parameters()]
    assert all(tuple(opt[f"{i}.{moment}"].shape) == s
               for i, s in enumerate(shapes) for moment in ("exp_avg", "exp_avg_sq"))
    assert [g["params"] for g in state["optimizer"]["param_groups"]] == [list(range(len(shapes)))]

    # The grid every rank computed with the sharded EMA model == the exported EMA weights in one process.
    grid = run / "samples/step-00000002.png"
    assert grid.is_file()
    pipe, settings = load_pipeline(export(run, tmp_path / "export"))
    v = cfg["validation"]
    again = image_grid(generate_from_settings(pipe, settings, v["prompts"] * 2, [0, 0, 1, 1]), cols=2)
    diff = np.abs(np.asarray(Image.open(grid), dtype=int) - np.asarray(again, dtype=int)).max()
    assert diff <= 1, f"validation grid differs from the exported EMA model's by {diff}"

    # One process resumes the FSDP checkpoint (weights, EMA, optimizer state) and trains on, at half
    # the global batch (one process's share): a change the user states, as resume checks require.
    cfg["trainer"].update(max_steps=3, batch_size=2, micro_batch_size=1)
    summary = train(from_dict(TrainConfig, cfg), resume="latest", allow_changes=["trainer.batch_size"])
    assert summary["step"] == 3 and summary["processes"] == 1
    # ... and FSDP resumes that one-process checkpoint.
    cfg["trainer"].update(max_steps=4, batch_size=4)
    reports = _launch(tmp_path, "fsdp-again", cfg, "--resume", "latest", "--resume-allow-changes", "trainer.batch_size")
    _assert_sharded(reports)
    assert reports[0]["summary"]["step"] == 4 and (run / "checkpoints/step-00000004/state.json").is_file()


def test_fsdp_loss_matches_ddp_and_one_process(tmp_path, train_assets, train_shards):
    """Global batch 8: 2 processes x micro 2 x 2 accumulation (FSDP2, then DDP) vs 1 process x micro 2 x 4.

    FSDP and DDP on the same 2 ranks see the same samples and noise from the same initial weights;
    only the gradient reduction differs (reduce-scatter vs all-reduce), so their curves agree to float
    rounding. One process sees other samples (each rank reads its own shards), so that comparison is
    statistical, as tests/test_reliability_scaleout.py's for DDP: mean loss within 10%, both fall.
    """
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    sections = dict(trainer={"max_steps": 12, "batch_size": 8, "micro_batch_size": 2, "log_every": 1},
                    checkpoint={"every_steps": 12}, mixing={"p": 0.3}, data={"num_workers": 0})
    _assert_sharded(_launch(tmp_path, "fsdp", _cfg(train_assets, train_shards, tmp_path / "fsdp", **sections)))
    ddp = _launch(tmp_path, "ddp", _cfg(train_assets, train_shards, tmp_path / "ddp", **sections),
                  launch_config=DDP_CONFIG)
    assert ddp[0]["dtensor_params"] == 0 and ddp[0]["distributed_type"] == "MULTI_CPU"
    train(from_dict(TrainConfig, _cfg(train_assets, train_shards, tmp_path / "one", **sections)))
    fsdp, ddp, one = (_losses(tmp_path / name) for name in ("fsdp", "ddp", "one"))
    assert len(fsdp) == len(ddp) == len(one) == 12
    print(f"losses: FSDP {fsdp}\nDDP {ddp}\none process {one}")
    assert np.allclose(fsdp, ddp, rtol=1e-4, atol=1e-5), max(abs(a - b) for a, b in zip(fsdp, ddp))
    assert abs(np.mean(fsdp) - np.mean(one)) <= 0.10 * np.mean(one)
    for curve in (fsdp, one):
        assert np.mean(curve[-4:]) < np.mean(curve[:4])


def test_fsdp_resume_equals_uninterrupted(tmp_path, train_assets, train_shards):
    """Steps 1-4 then `--resume latest` to 8 == 8 steps straight, both under FSDP.

    Validation at step 4 in both runs: the straight run trains on after it, so a validation that left
    the EMA weights gathered in the sharded model (or any rank out of step) would show here.
    """
    common = dict(mixing={"p": 0.5}, trainer={"max_steps": 8}, checkpoint={"every_steps": 4, "keep": 3},
                  validation={"every_steps": 4})
    _assert_sharded(_launch(tmp_path, "straight", _cfg(train_assets, train_shards, tmp_path / "straight", **common)))
    half = {**common, "trainer": {"max_steps": 4}}
    _assert_sharded(_launch(tmp_path, "first", _cfg(train_assets, train_shards, tmp_path / "resumed", **half)))
    reports = _launch(tmp_path, "second", _cfg(train_assets, train_shards, tmp_path / "resumed", **common),
                      "--resume", "latest")
    _assert_sharded(reports)
    assert reports[0]["summary"]["step"] == 8 and reports[0]["summary"]["samples"] == 32
    for name in ("model", "ema", "optimizer"):
        _assert_close(_tensors(tmp_path / "straight", 8, name), _tensors(tmp_path / "resumed", 8, name))
    a, b = (json.loads((tmp_path / run / "checkpoints/step-00000008/state.json").read_text())
            for run in ("straight", "resumed"))
    assert [r["cursor"] for r in a["ranks"]] == [r["cursor"] for r in b["ranks"]] and a["mix_counts"] == b["mix_counts"]
