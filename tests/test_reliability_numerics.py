"""Numerical faults: a NaN or inf loss stops training with a clear message before the
weights change, keeping the last good checkpoint; with trainer.on_nonfinite_loss=skip the step's
update is dropped and training goes on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_train import train_config_dict, write_config



pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: steadier on one thread


def _cfg_dict(train_assets, train_shards, run: Path, **trainer) -> dict:
    shards, side = train_shards
    return train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 8, **trainer},
                             checkpoint={"every_steps": 2, "keep": 10})


def _cfg(*args, **kw):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig

    return from_dict(TrainConfig, _cfg_dict(*args, **kw))


@pytest.fixture
def poison(monkeypatch):
    """poison(step, value): the loss of optimizer step `step` (0-based) becomes `value` (NaN or inf)."""
    from t2i_recap.trainer import Trainer

    real = Trainer._micro_step

    def arm(step: int, value: float) -> None:
        def micro_step(self, batch, micro):
            loss, counts, trunc = real(self, batch, micro)
            if self.step == step:
                loss = loss * value  # keeps the graph: the gradients are poisoned too
            return loss, counts, trunc

        monkeypatch.setattr(Trainer, "_micro_step", micro_step)

    return arm


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def _all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for name in ("model", "ema", "optimizer")
               for t in load_file(str(folder / f"{name}.safetensors")).values())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, train_assets, train_shards, poison, value):
    from t2i_recap.trainer import NonFiniteLossError, train

    run = tmp_path / "run"
    poison(5, value)  # the 6th step, after the step-4 checkpoint
    with pytest.raises(NonFiniteLossError) as info:
        train(_cfg(train_assets, train_shards, run))
    message = str(info.value)
    assert "step 6" in message and "not finite" in message and "step-00000004" in message
    assert "on_nonfinite_loss=skip" in message and "--resume latest" in message
    assert _steps(run) == [2, 4]  # nothing was saved from the poisoned weights
    assert _all_finite(run / "checkpoints/step-00000004")


def test_the_cli_reports_it_in_one_line_and_resume_finishes(tmp_path, train_assets, train_shards, poison, capsys):
    from t2i_recap.train import main
    from t2i_recap.trainer import train

    run = tmp_path / "run"
    cfg_file = write_config(tmp_path / "c.yaml", _cfg_dict(train_assets, train_shards, run))
    poison(3, math.nan)
    assert main(["--config", str(cfg_file)]) == 3
    err = capsys.readouterr().err
    assert "t2i-recap train: error: step 4: the training loss is not finite" in err and "Traceback" not in err
    assert _steps(run) == [2]
    poison(-1, 1.0)  # the fault is gone (e.g. a lower lr): the last good checkpoint resumes to the end
    reference = tmp_path / "reference"
    train(_cfg(train_assets, train_shards, reference))
    assert train(_cfg(train_assets, train_shards, run), resume="latest")["step"] == 8
    a = load_file(str(reference / "checkpoints/step-00000008/model.safetensors"))
    b = load_file(str(run / "checkpoints/step-00000008/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_skip_drops_the_update_and_goes_on(tmp_path, train_assets, train_shards, poison):
    from t2i_recap.trainer import train

    run = tmp_path / "run"
    cfg = _cfg(train_assets, train_shards, run, on_nonfinite_loss="skip")
    cfg.checkpoint.every_steps = 1
    poison(5, math.nan)
    summary = train(cfg)
    assert summary["step"] == 8 and summary["nonfinite_skipped"] == 1
    assert all(_all_finite(run / f"checkpoints/step-{s:08d}") for s in _steps(run))
    before, after = run / "checkpoints/step-00000005", run / "checkpoints/step-00000006"
    for name in ("model", "ema", "optimizer"):  # step 6 was skipped: no update of any state
        a, b = load_file(str(before / f"{name}.safetensors")), load_file(str(after / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((after / "state.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["ranks"][0]["cursor"] != json.loads(
        (before / "state.json").read_text())["ranks"][0]["cursor"]  # the data moved on past the bad batch
    changed = load_file(str(run / "checkpoints/step-00000007/model.safetensors"))
    kept = load_file(str(after / "model.safetensors"))
    assert any(not torch.equal(changed[k], kept[k]) for k in kept)  # and training resumed updating


def test_the_setting_is_validated():
    from t2i_recap.trainer import TrainerConfig

    with pytest.raises(ValueError, match="on_nonfinite_loss"):
        TrainerConfig(on_nonfinite_loss="ignore")
