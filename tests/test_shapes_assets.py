"""The shapes world's tiny pretrained parts: they load like hub checkpoints, pass their quality
gates, are reused when nothing changed and rebuilt when a setting did."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from t2i_recap.config import ConfigError, load_config
from t2i_recap.shapes.assets import (
    AssetsConfig,
    build_assets,
    gate_failures,
    main,
    part_fingerprints,
    read_manifest,
)
from t2i_recap.shapes.render import render
from t2i_recap.shapes.train_clip import ClipTrainConfig
from t2i_recap.shapes.train_vae import VaeTrainConfig
from t2i_recap.shapes.world import sample_scene


def _tiny_config(**kw) -> AssetsConfig:
    """A few training steps: enough to exercise build, save, reuse and rebuild in seconds."""
    clip = ClipTrainConfig(hidden_size=32, num_layers=1, steps=2, batch_size=8, eval_scenes=10, stats_scenes=50)
    vae = VaeTrainConfig(block_out_channels=[8, 16], norm_num_groups=8, steps=2, batch_size=4, eval_scenes=10)
    return AssetsConfig(clip=clip, vae=vae, **kw)


# ---------------------------------------------------------------- the real assets


@pytest.mark.slow  # the first user of shapes_assets pays for the real build (minutes)
def test_parts_load_with_from_pretrained(shapes_assets):
    from diffusers import AutoencoderKL
    from transformers import (AutoTokenizer, CLIPModel, CLIPProcessor, CLIPTextModel, CLIPVisionModel)

    tok = AutoTokenizer.from_pretrained(shapes_assets / "tokenizer")
    clip_tok = AutoTokenizer.from_pretrained(shapes_assets / "clip")
    caption = "A picture of a big red circle in the center."
    assert tok(caption).input_ids == clip_tok(caption).input_ids
    model = CLIPModel.from_pretrained(shapes_assets / "clip")
    text_model = CLIPTextModel.from_pretrained(shapes_assets / "clip")
    vision_model = CLIPVisionModel.from_pretrained(shapes_assets / "clip")
    processor = CLIPProcessor.from_pretrained(shapes_assets / "clip")
    vae = AutoencoderKL.from_pretrained(shapes_assets / "vae")

    # The text tower pools at the real EOS: padding a caption must not change its embedding.
    assert model.config.text_config.eos_token_id == tok.eos_token_id != tok.bos_token_id
    assert model.config.vision_config.image_size == 32 and model.config.vision_config.patch_size == 4
    ids = tok([caption, caption + " The red circle is above nothing else at all."], padding=True,
              return_tensors="pt")
    short = tok([caption], return_tensors="pt")
    with torch.no_grad():
        padded = text_model(**ids).pooler_output[0]
        alone = text_model(**short).pooler_output[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)

    # The standalone towers carry the CLIPModel's trained weights.
    pixels = processor(images=[render(sample_scene(random.Random(0)))], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vision_model(pixel_values=pixels).pooler_output,
                                   model.vision_model(pixel_values=pixels).pooler_output)

    # VAE: 4 latent channels, the side shrunk by the recorded factor, a positive scaling factor.
    factor = read_manifest(shapes_assets)["parts"]["vae"]["quality"]["downsample_factor"]
    assert factor == 2 ** (len(vae.config.block_out_channels) - 1) in (2, 4)
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor > 0
    x = torch.from_numpy(np.asarray(render(sample_scene(random.Random(1))))).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        z = vae.encode(x / 127.5 - 1).latent_dist.mode()
    assert z.shape == (1, 4, 32 // factor, 32 // factor)


@pytest.mark.slow  # the first user of shapes_assets pays for the real build (minutes)
def test_processor_matches_training_normalisation(shapes_assets):
    """The saved CLIPImageProcessor does what training did: x/255, then the measured mean/std."""
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(shapes_assets / "clip").image_processor
    image = render(sample_scene(random.Random(2)))
    got = processor(images=[image], return_tensors="pt").pixel_values[0]
    arr = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    torch.testing.assert_close(got, (arr - mean) / std, atol=1e-5, rtol=1e-5)
    assert 0.5 < min(processor.image_mean) and max(processor.image_std) < 0.5  # the world's stats, not ImageNet's


@pytest.mark.slow  # the first user of shapes_assets pays for the real build (minutes)
def test_quality_gates_hold(shapes_assets):
    manifest = read_manifest(shapes_assets)
    assert manifest["complete"] and manifest["fingerprint"]
    assert gate_failures(shapes_assets) == []
    clip = manifest["parts"]["clip"]["quality"]
    vae = manifest["parts"]["vae"]["quality"]
    assert clip["eval_scenes"] == 100 and clip["text_to_image_r_at_1"] >= 0.5
    assert clip["binding_r_at_1"] >= 0.5 > 2 * clip["binding_chance"]
    assert vae["eval_scenes"] >= 200 and vae["oracle_agreement"] >= 0.98
    # Scaled latents have about unit variance.
    assert 0.8 < vae["latent_std"] * vae["scaling_factor"] < 1.2


@pytest.mark.slow  # the first user of shapes_assets pays for the real build (minutes)
def test_recall_is_measured_not_recorded(shapes_assets):
    """Recompute R@1 from the saved model on fresh held-out scenes: the record is not stale."""
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from t2i_recap.shapes.scene_batches import sample_scenes
    from t2i_recap.shapes.train_clip import binding_recall, text_to_image_recall

    model = CLIPModel.from_pretrained(shapes_assets / "clip")
    tok = AutoTokenizer.from_pretrained(shapes_assets / "clip")
    processor = CLIPProcessor.from_pretrained(shapes_assets / "clip").image_processor
    scenes = sample_scenes(random.Random("fresh-scenes"), 100)
    assert text_to_image_recall(model, tok, processor, scenes, 32, seed=7) >= 0.5
    # Position and attribute binding, not just a bag of colours and shapes (chance 0.2).
    assert binding_recall(model, tok, processor, scenes, 32, seed=8, variants=4) >= 0.5


@pytest.mark.slow  # the first user of shapes_assets pays for the real build (minutes)
def test_second_build_reuses_cache(shapes_assets):
    before = {p: (shapes_assets / p / f).stat().st_mtime_ns
              for p, f in [("clip", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]}
    manifest = read_manifest(shapes_assets)
    start = time.perf_counter()
    assert main(["--out", str(shapes_assets)]) == 0
    assert time.perf_counter() - start < 60  # loads only, no training (minutes)
    after = {p: (shapes_assets / p / f).stat().st_mtime_ns
             for p, f in [("clip", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]}
    assert before == after
    assert read_manifest(shapes_assets)["parts"] == manifest["parts"]


# ---------------------------------------------------------------- cache logic on a tiny config


def _mtimes(out):
    return {p: (out / p).stat().st_mtime_ns for p in ("tokenizer", "clip", "vae")}


def test_changed_setting_rebuilds_only_that_part(tmp_path):
    cfg = _tiny_config()
    build_assets(tmp_path, cfg)
    first = read_manifest(tmp_path)
    assert first["complete"] and set(first["parts"]) == {"tokenizer", "clip", "vae"}
    built = _mtimes(tmp_path)

    build_assets(tmp_path, cfg)  # nothing changed
    assert _mtimes(tmp_path) == built

    cfg.vae.steps = 3
    build_assets(tmp_path, cfg)
    second = read_manifest(tmp_path)
    assert second["parts"]["vae"]["fingerprint"] != first["parts"]["vae"]["fingerprint"]
    assert second["parts"]["clip"] == first["parts"]["clip"]
    assert second["fingerprint"] != first["fingerprint"]
    now = _mtimes(tmp_path)
    assert now["vae"] != built["vae"] and now["clip"] == built["clip"]

    cfg.seed = 5  # the seed shapes both models
    build_assets(tmp_path, cfg)
    third = read_manifest(tmp_path)
    for part in ("clip", "vae"):
        assert third["parts"][part]["fingerprint"] != second["parts"][part]["fingerprint"]
    assert third["parts"]["tokenizer"] == second["parts"]["tokenizer"]


def test_broken_part_is_rebuilt_and_leftovers_ignored(tmp_path):
    cfg = _tiny_config()
    build_assets(tmp_path, cfg)
    (tmp_path / "vae" / "config.json").write_text("{not json")
    (tmp_path / ".clip.tmp-crashed").mkdir()  # what a killed build leaves behind
    build_assets(tmp_path, cfg)
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert read_manifest(tmp_path)["complete"]


def test_deterministic_given_seed(tmp_path):
    from safetensors.torch import load_file

    cfg = _tiny_config()
    a, b = build_assets(tmp_path / "a", cfg), build_assets(tmp_path / "b", cfg)
    for part, name in [("clip", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]:
        sa, sb = load_file(a / part / name), load_file(b / part / name)
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)
    qa, qb = read_manifest(a)["parts"], read_manifest(b)["parts"]
    assert qa["clip"]["quality"]["text_to_image_r_at_1"] == qb["clip"]["quality"]["text_to_image_r_at_1"]


def test_cli_reports_failed_gate(tmp_path, capsys):
    """A tiny config cannot reach the gates: the command says which and exits non-zero."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(json.dumps({
        "clip": {"hidden_size": 32, "num_layers": 1, "steps": 1, "batch_size": 8, "eval_scenes": 10,
                 "stats_scenes": 50},
        "vae": {"block_out_channels": [8, 16], "norm_num_groups": 8, "steps": 1, "batch_size": 4,
                "eval_scenes": 10},
    }))
    assert main(["--out", str(tmp_path / "out"), "--config", str(cfg_file)]) == 1
    captured = capsys.readouterr()
    assert "R@1" in captured.out and "oracle agreement" in captured.out
    assert "quality gate failed" in captured.err


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*clip.stepz"):
        load_config(AssetsConfig, bad)
    assert main(["--out", str(tmp_path / "o"), "--set", "vae.norm_num_groups=7"]) == 2
    with pytest.raises(ValueError, match="norm_num_groups"):
        VaeTrainConfig(block_out_channels=[16, 24], norm_num_groups=16)
    with pytest.raises(ValueError, match="num_heads"):
        ClipTrainConfig(hidden_size=30, num_heads=4)


def test_fingerprint_tracks_settings_not_gates():
    base = part_fingerprints(AssetsConfig())
    assert part_fingerprints(AssetsConfig()) == base
    assert part_fingerprints(AssetsConfig(min_clip_r_at_1=0.9)) == base  # gates re-check, never retrain
    changed = part_fingerprints(AssetsConfig(clip=ClipTrainConfig(steps=301)))
    assert changed["clip"] != base["clip"] and changed["vae"] == base["vae"]


# ---------------------------------------------------------------- the prebuilt parts shipped with the package


def test_prebuilt_matches_this_code():
    """The shipped parts were built by this code with the default settings; editing the world,
    the renderer or a trainer without rebuilding them fails here, not silently in a demo."""
    from t2i_recap.shapes.assets import PREBUILT

    shipped = read_manifest(PREBUILT)
    assert shipped["complete"], f"{PREBUILT}/assets.json is missing or incomplete"
    portable = part_fingerprints(AssetsConfig(), libraries=False)
    stale = [p for p in portable if shipped["parts"][p].get("portable_fingerprint") != portable[p]]
    assert not stale, (f"prebuilt {stale} no longer match the code: rebuild them with `t2i-recap shapes assets "
                       f"--out DIR --no-prebuilt` and copy DIR's parts and assets.json (with portable fingerprints) "
                       f"to {PREBUILT}")
    assert gate_failures(PREBUILT) == []


def test_prebuilt_is_copied_not_trained(tmp_path, monkeypatch):
    from t2i_recap.shapes import assets

    def refuse(folder, cfg, out):
        raise AssertionError("trained a part the package ships")

    monkeypatch.setattr(assets, "_BUILDERS", {p: refuse for p in assets.PARTS})
    out = build_assets(tmp_path / "a")
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["fingerprint"] == read_manifest(assets.PREBUILT)["fingerprint"]
    for part, name in [("clip", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]:
        assert (out / part / name).read_bytes() == (assets.PREBUILT / part / name).read_bytes()
        assert manifest["parts"][part]["copied_from"] == str(assets.PREBUILT)
    build_assets(out)  # now reused in place, not copied again
    assert read_manifest(out)["parts"] == manifest["parts"]


def test_prebuilt_that_does_not_match_or_load_is_not_used(tmp_path, monkeypatch):
    import shutil

    from t2i_recap.shapes import assets

    prebuilt = tmp_path / "prebuilt"
    shutil.copytree(assets.PREBUILT, prebuilt)
    (prebuilt / "vae" / "config.json").write_text("{not json")
    built = []

    def record(folder, cfg, out, part):
        built.append(part)
        raise RuntimeError(f"would build {part}")

    monkeypatch.setattr(assets, "_BUILDERS", {p: (lambda f, c, o, p=p: record(f, c, o, p)) for p in assets.PARTS})
    with pytest.raises(RuntimeError, match="would build vae"):  # broken: built, never copied
        build_assets(tmp_path / "a", prebuilt=prebuilt)
    assert built == ["vae"] and read_manifest(tmp_path / "a")["parts"]["clip"]["copied_from"] == str(prebuilt)
    with pytest.raises(RuntimeError, match="would build clip"):  # other settings: the clip is built
        build_assets(tmp_path / "b", _tiny_config(), prebuilt=prebuilt)
    with pytest.raises(RuntimeError, match="would build tokenizer"):  # --no-prebuilt
        build_assets(tmp_path / "c", prebuilt=None)
