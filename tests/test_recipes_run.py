"""Every training recipe under configs/train runs as shipped, with only sizes and paths overridden:
train (bf16 VAE, bf16 text features and bf16 mixed precision where the recipe asks) -> validation ->
checkpoint -> resume -> export -> generate from the export with diffusers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from fixtures_train import TRAIN_RES
from t2i_recap.config import from_dict
from t2i_recap.train_config import TrainConfig
from t2i_recap.trainer import train

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "train").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Recipes differ in mixed_precision, which accelerate fixes per process; forget it around each run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, shapes_tokenizer_dir) -> Path:
    """A 2-layer T5EncoderModel with the fixtures' tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(shapes_tokenizer_dir))
    out = tmp_path_factory.mktemp("tiny_t5") / "t5"
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    T5EncoderModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _shrunk(recipe: Path, assets: Path, t5: Path, shards: Path, run_dir: Path, max_steps: int) -> dict:
    """The recipe as shipped, with sizes and paths replaced (nothing else)."""
    raw = yaml.safe_load(recipe.read_text())
    cfg = copy.deepcopy(raw)
    data = cfg.setdefault("data", {})
    data.update(shards=str(shards), resolution=TRAIN_RES, shuffle_buffer=8, num_workers=0)
    if str(data.get("recaption", "")).startswith("sidecar:") or data.get("recaption_dir"):
        data.update(recaption="json:gold_caption", recaption_dir=None)  # the fixture shards carry gold captions
    else:
        data["recaption"] = "json:gold_caption"
    data["original_caption"] = "txt"
    text = cfg.setdefault("text_encoder", {})
    is_t5 = "t5" in str(text.get("name_or_path", "")).lower()
    text["name_or_path"] = str(t5 if is_t5 else assets / "clip")
    text.pop("subfolder", None)
    if is_t5:
        text["max_length"] = 16
    features = cfg.setdefault("features", {})
    features["vae"] = str(assets / "vae")
    features.pop("vae_subfolder", None)
    if features.get("cache_dir"):
        features["cache_dir"] = str(run_dir.parent / "cache")
    cfg["model"] = {**cfg.get("model", {}), "name": "DiT-tiny/2"}
    cfg.setdefault("trainer", {}).update(run_dir=str(run_dir), max_steps=max_steps, batch_size=4, micro_batch_size=2,
                                         log_every=1)
    cfg.setdefault("checkpoint", {})["every_steps"] = 2
    val = cfg.setdefault("validation", {})
    val.update(every_steps=2, seeds=[0], num_inference_steps=2, batch_size=2)
    val["prompts"] = (val.get("prompts") or ["a red circle"])[:1]
    return cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_as_shipped(recipe, tmp_path, train_assets, train_shards, tiny_t5):
    from t2i_recap.export import main as export_main
    from t2i_recap.generation import generate_from_settings, load_pipeline

    shards = train_shards[0]
    run = tmp_path / "run"
    half = from_dict(TrainConfig, _shrunk(recipe, train_assets, tiny_t5, shards, run, max_steps=2))
    train(half)
    assert (run / "checkpoints" / "step-00000002").is_dir()
    assert (run / "samples" / "step-00000002.png").is_file()  # validation ran with the recipe's dtypes
    full = from_dict(TrainConfig, _shrunk(recipe, train_assets, tiny_t5, shards, run, max_steps=4))
    summary = train(full, resume="latest")
    assert summary["step"] == 4
    assert (run / "samples" / "step-00000004.png").is_file()
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    pipe, settings = load_pipeline(out)
    images = generate_from_settings(pipe, settings, ["a red circle"], [0], num_inference_steps=2)
    assert [im.size for im in images] == [(TRAIN_RES, TRAIN_RES)]
    assert json.loads((out / "t2i_recap.json").read_text())["resolution"] == TRAIN_RES
