"""Validation loss on held-out shards at fixed timesteps and noise (validation.loss_every_steps)."""

from __future__ import annotations

import math

import pytest
import torch

from fixtures_train import train_config_dict
from t2i_recap.config import from_dict
from t2i_recap.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _raw(train_assets, train_shards, run_dir, **sections) -> dict:
    shards, side = train_shards
    return train_config_dict(train_assets, shards, run_dir, side, **sections)


def test_the_trainer_logs_the_held_out_loss_and_trains_without_the_held_out_shard(tmp_path, train_assets, train_shards):
    from t2i_recap.trainer import Trainer

    raw = _raw(train_assets, train_shards, tmp_path / "run", trainer={"max_steps": 4},
               validation={"loss_every_steps": 2, "loss_batches": 2, "loss_batch_size": 4, "loss_timesteps": 3})
    trainer = Trainer(from_dict(TrainConfig, raw))
    all_shards = trainer.source.shards + trainer.heldout.shards
    assert len(trainer.heldout.shards) == 1 and trainer.heldout.shards[0] not in trainer.source.shards
    assert len(set(all_shards)) == 2  # the two fixture shards: one trains, one is held out
    summary = trainer.fit()
    history = summary["validation_loss"]
    assert [h["step"] for h in history] == [2, 4]
    for h in history:
        assert {"val_loss", "val_loss/original", "val_loss/recaption"} <= set(h)
        assert all(math.isfinite(h[k]) and h[k] > 0 for k in h if k != "step")
    assert history[0]["val_loss"] != history[1]["val_loss"]  # the weights changed between the two


def test_the_same_weights_score_the_same_and_the_noise_is_fixed(tmp_path, train_assets, train_shards):
    from t2i_recap.trainer import Trainer

    raw = _raw(train_assets, train_shards, tmp_path / "run", trainer={"max_steps": 1},
               validation={"loss_every_steps": 0, "loss_batches": 1, "loss_batch_size": 4, "loss_timesteps": 2})
    trainer = Trainer(from_dict(TrainConfig, raw))
    first, again = trainer.validation_loss(), trainer.validation_loss()
    assert first == again
    other_seed = _raw(train_assets, train_shards, tmp_path / "run2", trainer={"max_steps": 1, "seed": 7},
                      validation={"loss_every_steps": 0, "loss_batches": 1, "loss_batch_size": 4, "loss_timesteps": 2})
    t2 = Trainer(from_dict(TrainConfig, other_seed))
    t2._bare().load_state_dict(trainer._bare().state_dict())
    assert t2.validation_loss() == first  # the trainer's seed does not move the validation noise
    trainer.val_loss.cfg = type(trainer.val_loss.cfg)(**{**vars(trainer.val_loss.cfg), "loss_seed": 1})
    assert trainer.validation_loss() != first


def test_no_held_out_data_is_refused(tmp_path, train_assets, train_shards):
    from t2i_recap.trainer import Trainer

    shards, _ = train_shards
    raw = _raw(train_assets, train_shards, tmp_path / "a", validation={"loss_every_steps": 2, "holdout_shards": 2})
    with pytest.raises(ValueError, match="leaves none to train on"):
        Trainer(from_dict(TrainConfig, raw))
    raw = _raw(train_assets, train_shards, tmp_path / "b",
               validation={"loss_every_steps": 2, "loss_shards": str(sorted(shards.glob("*.tar"))[0])})
    with pytest.raises(ValueError, match="shares shards with data.shards"):
        Trainer(from_dict(TrainConfig, raw))


def test_a_resume_that_changes_the_held_out_shards_is_refused():
    from t2i_recap.checkpoint import HOLDOUT_KEY, ResumeConfigError, check_resume_config

    off = {"validation": {"loss_every_steps": -1, "holdout_shards": 1, "loss_shards": None}}
    on = {"validation": {"loss_every_steps": 100, "holdout_shards": 1, "loss_shards": None}}
    slower = {"validation": {"loss_every_steps": 500, "holdout_shards": 1, "loss_shards": None}}
    with pytest.raises(ResumeConfigError, match=HOLDOUT_KEY):
        check_resume_config(off, on)
    assert check_resume_config(on, slower) == {"validation.loss_every_steps": (100, 500)}  # cadence alone: harmless
    assert HOLDOUT_KEY in check_resume_config(off, on, allow=[HOLDOUT_KEY])


def test_ddpm_validation_loss_is_unweighted():
    from t2i_recap.objectives import ObjectiveConfig, build_objective

    obj = build_objective(ObjectiveConfig(name="ddpm", snr_gamma=1.0))  # SNR > 1 at t = 166
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = obj.fixed_timesteps(3)
    assert t.tolist() == [166, 500, 833]

    def model_fn(x, t, **cond):
        return x * 0.5

    plain = obj.loss_at(model_fn, x0, t, noise)
    weighted = obj.loss_at(model_fn, x0, t, noise, weighted=True)
    expected = torch.nn.functional.mse_loss(obj.train_scheduler.add_noise(x0, noise, t) * 0.5, noise)
    torch.testing.assert_close(plain, expected)
    assert not torch.allclose(plain, weighted)
