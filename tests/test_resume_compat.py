"""--resume compares the checkpoint's resolved config with the new one: changes that break exact
resumption are refused naming the keys; harmless ones (length, logging, validation, checkpoint
cadence) are allowed and logged; --resume-allow-changes lets a named (or any) change through."""

from __future__ import annotations

import logging

import pytest

from fixtures_train import train_config_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(train_assets, train_shards, run, **sections):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig

    shards, side = train_shards
    base = {"trainer": {"max_steps": 2}, "checkpoint": {"every_steps": 2}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return from_dict(TrainConfig, train_config_dict(train_assets, shards, run, side, **base))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_assets, train_shards):
    """A run folder holding a checkpoint at step 2 (never written to by the tests: they refuse or copy)."""
    import torch

    from t2i_recap.trainer import train

    run = tmp_path_factory.mktemp("compat") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_cfg(train_assets, train_shards, run))
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.parametrize("sections, keys", [
    ({"objective": {"name": "ddpm"}}, ["objective.name"]),
    ({"trainer": {"batch_size": 8}}, ["trainer.batch_size"]),
    ({"model": {"name": "DiT-S/2"}}, ["model.name"]),
    ({"mixing": {"p": 0.5}}, ["mixing.p"]),
    ({"data": {"shards": "elsewhere/{00000..00001}.tar"}}, ["data.shards"]),
])
def test_breaking_change_is_refused_naming_the_keys(trained, train_assets, train_shards, sections, keys):
    from t2i_recap.checkpoint import ResumeConfigError
    from t2i_recap.trainer import Trainer

    with pytest.raises(ResumeConfigError) as err:
        Trainer(_cfg(train_assets, train_shards, trained, **sections), resume="latest")
    for key in keys:
        assert key in str(err.value)
    assert "trainer.max_steps" not in str(err.value)


def test_harmless_changes_are_allowed_and_logged(trained, train_assets, train_shards, tmp_path, caplog):
    import shutil

    from t2i_recap.trainer import train

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = _cfg(train_assets, train_shards, run, trainer={"max_steps": 3, "log_every": 5},
               validation={"num_inference_steps": 3}, checkpoint={"every_steps": 3, "keep": 3})
    with caplog.at_level(logging.WARNING, logger="t2i_recap"):
        summary = train(cfg, resume="latest")
    assert summary["step"] == 3
    logged = caplog.text
    for key in ("trainer.max_steps", "trainer.log_every", "validation.num_inference_steps", "checkpoint.every_steps",
                "trainer.run_dir"):
        assert f"resume: {key} changed" in logged, key


@pytest.mark.parametrize("allow", [["objective"], ["objective.name"], True])
def test_override_lets_a_breaking_change_through(trained, train_assets, train_shards, allow):
    from t2i_recap.trainer import Trainer

    trainer = Trainer(_cfg(train_assets, train_shards, trained, objective={"name": "ddpm"}), resume="latest",
                      allow_changes=allow)
    assert trainer.step == 2


def test_override_of_other_keys_still_refuses(trained, train_assets, train_shards):
    from t2i_recap.checkpoint import ResumeConfigError
    from t2i_recap.trainer import Trainer

    with pytest.raises(ResumeConfigError, match="mixing.p"):
        Trainer(_cfg(train_assets, train_shards, trained, objective={"name": "ddpm"}, mixing={"p": 0.5}),
                resume="latest", allow_changes=["objective"])


def test_cli_refusal_is_one_line_with_exit_2(trained, train_assets, train_shards, tmp_path, capsys):
    from fixtures_train import write_config
    from t2i_recap.train import main

    shards, side = train_shards
    cfg = train_config_dict(train_assets, shards, trained, side, trainer={"max_steps": 2, "batch_size": 8},
                            checkpoint={"every_steps": 2})
    assert main(["--config", str(write_config(tmp_path / "c.yaml", cfg)), "--resume", "latest"]) == 2
    assert "trainer.batch_size: 4 -> 8" in capsys.readouterr().err


def test_tracker_choice_is_a_harmless_change():
    """Switching trackers (TensorBoard to wandb) on a resume changes only where metrics go."""
    from t2i_recap.checkpoint import check_resume_config

    saved = {"trainer": {"log_with": ["tensorboard"], "lr": 1e-4}}
    changes = check_resume_config(saved, {"trainer": {"log_with": ["wandb"], "lr": 1e-4}})
    assert changes == {"trainer.log_with": (["tensorboard"], ["wandb"])}


def test_speed_switches_are_harmless_changes():
    """compile and the fused blocks change kernels, not the computation (fast_dit matches diffusers)."""
    from t2i_recap.checkpoint import check_resume_config

    saved = {"model": {"name": "DiT-B/4", "compile": False, "fast_blocks": False}}
    new = {"model": {"name": "DiT-B/4", "compile": "auto", "fast_blocks": True}}
    assert set(check_resume_config(saved, new)) == {"model.compile", "model.fast_blocks"}
