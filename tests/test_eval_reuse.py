"""A rerun of `eval run` into an existing --out reuses an image only when the model (by content),
its prompt, seed, step count, guidance and scheduler all match what made it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from t2i_recap.config import from_dict
from t2i_recap.evaluate.run import EvalConfig, run_eval

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _noise(pipe, prompts, seeds, settings):
    return [Image.fromarray(np.random.default_rng(s).integers(0, 256, (settings.resolution,) * 2 + (3,), dtype=np.uint8))
            for s in seeds]


def _prompts(path, prompts=PROMPTS):
    path.write_text("\n".join(prompts) + "\n")
    return path


def _run(out, model, suite, **kw) -> dict:
    cfg = from_dict(EvalConfig, dict(model=str(model), out=str(out), suite=str(suite), images_per_prompt=2,
                                     batch_size=8) | kw)
    return json.loads(run_eval(cfg, generate=_noise).read_text())


def _generated(report) -> int:
    return report["timing"]["images_generated"]["raw"]


@pytest.fixture
def first(tmp_path, eval_pipeline_dir):
    """An --out folder holding one finished run (3 prompts x 2 images, seed 0, 2 steps)."""
    suite = _prompts(tmp_path / "p.txt")
    out = tmp_path / "eval"
    assert _generated(_run(out, eval_pipeline_dir, suite, steps=2)) == 6
    return out, suite


def test_same_everything_is_reused(first, eval_pipeline_dir):
    out, suite = first
    assert _generated(_run(out, eval_pipeline_dir, suite, steps=2)) == 0


@pytest.mark.parametrize("change", [{"seed": 7}, {"steps": 3}, {"guidance": 2.5},
                                    {"scheduler": "EulerDiscreteScheduler"}])
def test_other_settings_regenerate_every_image(first, eval_pipeline_dir, change):
    out, suite = first
    report = _run(out, eval_pipeline_dir, suite, **({"steps": 2} | change))
    assert _generated(report) == 6
    # and the new settings' images are reused in turn
    assert _generated(_run(out, eval_pipeline_dir, suite, **({"steps": 2} | change))) == 0


def test_other_prompt_file_regenerates_the_changed_prompts(first, eval_pipeline_dir, tmp_path):
    out, _ = first
    other = _prompts(tmp_path / "other.txt", ["a red circle", "two yellow stars", "a green triangle"])
    assert _generated(_run(out, eval_pipeline_dir, other, steps=2)) == 2  # prompt 1's two images


def test_other_model_regenerates(first, tmp_path, shapes_tokenizer_dir):
    from fixtures_eval import build_tiny_pipeline

    out, suite = first
    other = build_tiny_pipeline(tmp_path / "other_model", shapes_tokenizer_dir, seed=1)
    report = _run(out, other, suite, steps=2)
    assert _generated(report) == 6
    assert report["provenance"]["model"]["path"] == str(other.resolve())


def test_same_model_under_another_path_is_reused(first, eval_pipeline_dir, tmp_path):
    out, suite = first
    copy = tmp_path / "copied_model"
    shutil.copytree(eval_pipeline_dir, copy)
    assert _generated(_run(out, copy, suite, steps=2)) == 0


def test_changed_weights_in_the_same_folder_regenerate(first, eval_pipeline_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out, suite = first
    model = tmp_path / "model_copy"
    shutil.copytree(eval_pipeline_dir, model)
    assert _generated(_run(out, model, suite, steps=2)) == 0
    weights = next((model / "transformer").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01  # same names, shapes and offsets: same header and size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert _generated(_run(out, model, suite, steps=2)) == 6


def test_images_without_a_record_are_regenerated(first, eval_pipeline_dir):
    out, suite = first
    (out / "images" / "raw" / "imageset.json").unlink()  # a folder from before the record, or a foreign one
    assert _generated(_run(out, eval_pipeline_dir, suite, steps=2)) == 6


def test_run_folder_is_exported_again_when_its_checkpoint_changed(tmp_path, train_assets, train_shards):
    from fixtures_train import train_config_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    shards, side = train_shards
    run = tmp_path / "run"

    def cfg(steps):
        return from_dict(TrainConfig, train_config_dict(train_assets, shards, run, side, trainer={"max_steps": steps},
                                                        checkpoint={"every_steps": 2}, validation={"every_steps": -1}))
    train(cfg(2))
    suite = _prompts(tmp_path / "p.txt")
    out = tmp_path / "eval"
    first = _run(out, run, suite, images_per_prompt=1)
    assert first["provenance"]["model"]["sidecar"]["step"] == 2 and _generated(first) == 3
    again = _run(out, run, suite, images_per_prompt=1)
    assert again["provenance"]["model"]["sha256"] == first["provenance"]["model"]["sha256"] and _generated(again) == 0
    train(cfg(4), resume="latest")
    later = _run(out, run, suite, images_per_prompt=1)
    assert later["provenance"]["model"]["sidecar"]["step"] == 4
    assert later["provenance"]["model"]["sha256"] != first["provenance"]["model"]["sha256"]
    assert _generated(later) == 3
