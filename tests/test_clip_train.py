"""`t2i-recap clip train`: contrastive CLIP training on shapes shards with recaption sidecars."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_train import write_shards
from t2i_recap.clip.config import ClipTrainConfig
from t2i_recap.clip.train import main, mixed_captions, train
from t2i_recap.config import ConfigError, load_config
from t2i_recap.mixing import MixingConfig

RES = 16


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_shards")
    write_shards(root / "shards", num=24, shard_size=12, resolution=RES, sidecar_dir=root / "sidecars")
    return root / "shards", root / "sidecars"


def _cfg(clip_shards, run_dir, *extra):
    shards, sidecars = clip_shards
    return load_config(ClipTrainConfig, "configs/clip/shapes_tiny.yaml", [
        f"data.shards={shards}", f"data.recaption_dir={sidecars}", f"data.resolution={RES}", "data.shuffle_buffer=8",
        f"model.image_size={RES}", "model.hidden_size=32", "model.text_hidden_size=32", "model.projection_dim=32",
        f"trainer.run_dir={run_dir}", "trainer.batch_size=8", "trainer.max_steps=4", "checkpoint.every_steps=2",
        "optim.warmup_steps=2", *extra])


@pytest.fixture(scope="module")
def trained(clip_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("clip_run") / "run"
    summary = train(_cfg(clip_shards, run, "trainer.max_steps=40", "checkpoint.every_steps=40"))
    return run, summary


def test_loss_decreases(trained):
    losses = trained[1]["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_export_loads_with_from_pretrained(trained):
    from transformers import AutoProcessor, CLIPModel, CLIPProcessor

    export = trained[0] / "export"
    model = CLIPModel.from_pretrained(str(export))
    processor = CLIPProcessor.from_pretrained(str(export))
    auto = AutoProcessor.from_pretrained(str(export))
    assert type(auto).__name__ == "CLIPProcessor"
    assert model.config.text_config.max_position_embeddings == 64  # the recipe's text_max_length
    inputs = processor(text=["a red circle"], images=[torch.zeros(3, RES, RES).numpy()], return_tensors="pt",
                       padding=True, input_data_format="channels_first", do_rescale=False)
    assert inputs.pixel_values.shape == (1, 3, RES, RES)
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits_per_image).all()
    weights = load_file(str(export / "model.safetensors"))
    ck = load_file(str(trained[0] / "checkpoints" / "step-00000040" / "model.safetensors"))
    assert torch.equal(weights["text_projection.weight"], ck["text_projection.weight"])


def test_resume_equals_straight(clip_shards, tmp_path):
    train(_cfg(clip_shards, tmp_path / "straight"))
    resumed_dir = tmp_path / "resumed"
    summary = train(_cfg(clip_shards, resumed_dir), resume=str(tmp_path / "straight" / "checkpoints" / "step-00000002"))
    assert summary["step"] == 4
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(resumed_dir / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    assert summary["mix_counts"] == straight["mix_counts"]


def test_existing_run_dir_needs_resume(trained, clip_shards):
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(_cfg(clip_shards, trained[0]))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_mixing_p_draws_expected_field(p):
    batch = {"original": [f"orig {i}" for i in range(10)],
             "recaption": [f"recap {i}" if i % 5 else None for i in range(10)]}
    cfg = ClipTrainConfig(mixing=MixingConfig(p=p, cfg_dropout=0.0))
    texts, counts = mixed_captions(batch, cfg, torch.Generator().manual_seed(0))
    if p == 0.0:  # recaptions, and the 2 samples without one fall back to their original (counted)
        assert texts == [f"recap {i}" if i % 5 else f"orig {i}" for i in range(10)]
        assert (counts.recaption, counts.original, counts.fallback_to_original) == (8, 2, 2)
    else:
        assert texts == batch["original"]
        assert (counts.original, counts.recaption, counts.fallback_to_recaption) == (10, 0, 0)


def test_mixing_counts_over_a_run(clip_shards, tmp_path):
    summary = train(_cfg(clip_shards, tmp_path / "p1", "mixing.p=1.0", "trainer.max_steps=2"))
    assert summary["mix_counts"]["original"] == 16 and summary["mix_counts"]["recaption"] == 0


def test_cfg_dropout_rejected(clip_shards, tmp_path):
    with pytest.raises(ConfigError, match="cfg_dropout"):
        _cfg(clip_shards, tmp_path, "mixing.cfg_dropout=0.1")


def test_cli_trains(clip_shards, tmp_path):
    shards, sidecars = clip_shards
    rc = main(["--config", "configs/clip/shapes_tiny.yaml", "--set", f"data.shards={shards}",
               "--set", f"data.recaption_dir={sidecars}", "--set", f"data.resolution={RES}",
               "--set", f"model.image_size={RES}", "--set", f"trainer.run_dir={tmp_path / 'cli'}",
               "--set", "trainer.max_steps=1", "--set", "trainer.batch_size=4"])
    assert rc == 0 and (tmp_path / "cli" / "export" / "config.json").is_file()


@pytest.mark.slow
def test_two_processes_resume_equals_straight(clip_shards, tmp_path):
    """Two gloo CPU processes (`accelerate launch --multi_gpu`): resuming from step 2 gives step 4 exactly."""
    import os
    import subprocess
    import sys

    shards, sidecars = clip_shards

    def launch(run_dir, *extra):
        sets = [f"data.shards={shards}", f"data.recaption_dir={sidecars}", f"data.resolution={RES}",
                "data.shuffle_buffer=8", f"model.image_size={RES}", "model.hidden_size=32", "model.text_hidden_size=32",
                "model.projection_dim=32", f"trainer.run_dir={run_dir}", "trainer.batch_size=4", "trainer.max_steps=4",
                "checkpoint.every_steps=2"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "t2i_recap.clip.train",
               "--config", "configs/clip/shapes_tiny.yaml", *[a for s in sets for a in ("--set", s)], *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(tmp_path / "straight")
    launch(tmp_path / "resumed", "--resume", str(tmp_path / "straight" / "checkpoints" / "step-00000002"))
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    state = json.loads((tmp_path / "straight" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2
