"""Learning-rate schedules from diffusers (constant, cosine, linear, with warm-up), exact resume in the
middle of a warm-up, and trackers through accelerate (TensorBoard by default, wandb offline)."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from fixtures_train import train_config_dict
from t2i_recap.config import from_dict
from t2i_recap.lr_schedule import lr_factor
from t2i_recap.train_config import TrainConfig
from t2i_recap.trainer import OptimConfig, train


def _cfg(train_assets, train_shards, run_dir, **sections) -> TrainConfig:
    shards, side = train_shards
    return from_dict(TrainConfig, train_config_dict(train_assets, shards, run_dir, side, **sections))


@pytest.mark.parametrize("schedule, at_end", [("constant", 1.0), ("cosine", 0.0), ("linear", 0.0)])
def test_schedule_at_start_warmup_end_and_end(schedule, at_end):
    f = lr_factor(schedule, 10, 100)
    assert f(0) == 0.0 and math.isclose(f(5), 0.5) and math.isclose(f(10), 1.0)
    assert math.isclose(f(100), at_end, abs_tol=1e-9)
    mid = f(55)  # halfway through the decay
    assert math.isclose(mid, {"constant": 1.0, "cosine": 0.5, "linear": 0.5}[schedule], rel_tol=1e-6)


def test_no_warmup_starts_at_peak():
    assert lr_factor("constant", 0, 10)(0) == 1.0 and lr_factor("cosine", 0, 10)(0) == 1.0


def test_bad_schedule_names_the_key():
    with pytest.raises(ValueError, match=r"optim\.schedule"):
        OptimConfig(schedule="exponential")
    with pytest.raises(ValueError, match=r"optim\.schedule_steps"):
        OptimConfig(schedule_steps=0)


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_trained_lr_follows_schedule_and_tensorboard_logs(tmp_path, train_assets, train_shards, one_thread):
    run = tmp_path / "run"
    train(_cfg(train_assets, train_shards, run, optim={"lr": 1e-3, "schedule": "linear", "warmup_steps": 2},
               trainer={"max_steps": 4}, checkpoint={"every_steps": 4}))
    assert list((run / "logs").glob("events.out.tfevents.*"))
    f = lr_factor("linear", 2, 4)
    got = _scalars(run / "logs", "train/lr")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for step, value in got:  # logged after step `step`, whose update used lr(step - 1)
        assert math.isclose(value, 1e-3 * f(step - 1), rel_tol=1e-6)
    assert len(_scalars(run / "logs", "train/loss")) == 4


def test_resume_mid_warmup_equals_straight(tmp_path, train_assets, train_shards, one_thread):
    optim = {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 6, "schedule_steps": 8}
    common = dict(optim=optim, trainer={"max_steps": 8}, checkpoint={"every_steps": 4, "keep": 3}, ema={"enabled": False})
    train(_cfg(train_assets, train_shards, tmp_path / "straight", **common))
    train(_cfg(train_assets, train_shards, tmp_path / "resumed", **{**common, "trainer": {"max_steps": 4}}))
    train(_cfg(train_assets, train_shards, tmp_path / "resumed", **common), resume="latest")
    for name in ("model", "optimizer"):
        a = load_file(str(tmp_path / "straight/checkpoints/step-00000008" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "resumed/checkpoints/step-00000008" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # and the schedule mattered: a constant-lr run ends elsewhere
    train(_cfg(train_assets, train_shards, tmp_path / "flat", **{**common, "optim": {"lr": 1e-3}}))
    a = load_file(str(tmp_path / "straight/checkpoints/step-00000008/model.safetensors"))
    c = load_file(str(tmp_path / "flat/checkpoints/step-00000008/model.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4


def test_wandb_offline_run_folder(tmp_path, train_assets, train_shards, one_thread, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    run = tmp_path / "run"
    train(_cfg(train_assets, train_shards, run, trainer={"max_steps": 2, "log_with": ["tensorboard", "wandb"]},
               checkpoint={"every_steps": 2}))
    offline = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert list((run / "logs").glob("events.out.tfevents.*"))  # TensorBoard still written beside it


def test_unknown_tracker_names_the_key():
    from t2i_recap.trainer import TrainerConfig

    with pytest.raises(ValueError, match=r"trainer\.log_with"):
        TrainerConfig(log_with=["tensorbored"])


def test_resume_refuses_a_new_max_steps_under_a_decaying_schedule(tmp_path, train_assets, train_shards, one_thread):
    from t2i_recap.checkpoint import ResumeConfigError

    run = tmp_path / "run"
    common = dict(optim={"schedule": "linear"}, checkpoint={"every_steps": 2}, ema={"enabled": False})
    train(_cfg(train_assets, train_shards, run, trainer={"max_steps": 2}, **common))
    with pytest.raises(ResumeConfigError, match=r"optim\.schedule_steps"):
        train(_cfg(train_assets, train_shards, run, trainer={"max_steps": 4}, **common), resume="latest")
    # a constant schedule does not depend on max_steps: extending is fine
    flat = tmp_path / "flat"
    train(_cfg(train_assets, train_shards, flat, trainer={"max_steps": 2}, **{**common, "optim": {}}))
    assert train(_cfg(train_assets, train_shards, flat, trainer={"max_steps": 3}, **{**common, "optim": {}}),
                 resume="latest")["step"] == 3
