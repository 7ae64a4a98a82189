"""The training loop end to end on tiny models: resume == uninterrupted, cache == on the fly,
export loads with DiffusionPipeline.from_pretrained in a fresh process and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fixtures_train import train_config_dict, write_config
from t2i_recap.config import from_dict
from t2i_recap.train_config import TrainConfig
from t2i_recap.trainer import train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(train_assets, train_shards, run_dir, **sections) -> TrainConfig:
    shards, side = train_shards
    return from_dict(TrainConfig, train_config_dict(train_assets, shards, run_dir, side, **sections))


def _tensors(run_dir: Path, step: int, name: str) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"max abs difference {worst}"


def test_resume_equals_uninterrupted(tmp_path, train_assets, train_shards):
    # 8 steps x 4 samples over 24 samples: the run crosses an epoch boundary after the resume point.
    common = dict(mixing={"p": 0.5}, trainer={"max_steps": 8}, checkpoint={"every_steps": 4, "keep": 3})
    train(_cfg(train_assets, train_shards, tmp_path / "straight", **common))
    half = {**common, "trainer": {"max_steps": 4}}
    train(_cfg(train_assets, train_shards, tmp_path / "resumed", **half))
    summary = train(_cfg(train_assets, train_shards, tmp_path / "resumed", **common), resume="latest")
    assert summary["step"] == 8 and summary["samples"] == 32
    for name in ("model", "ema", "optimizer"):
        _assert_close(_tensors(tmp_path / "straight", 8, name), _tensors(tmp_path / "resumed", 8, name))
    a = json.loads((tmp_path / "straight/checkpoints/step-00000008/state.json").read_text())
    b = json.loads((tmp_path / "resumed/checkpoints/step-00000008/state.json").read_text())
    assert a["ranks"][0]["cursor"] == b["ranks"][0]["cursor"] and a["mix_counts"] == b["mix_counts"]
    # the run folder holds the resolved config, TensorBoard logs and a summary
    assert (tmp_path / "resumed/config.yaml").is_file() and list((tmp_path / "resumed/logs").iterdir())


def test_a_run_folder_with_checkpoints_needs_resume(tmp_path, train_assets, train_shards):
    cfg = _cfg(train_assets, train_shards, tmp_path / "run", trainer={"max_steps": 2}, checkpoint={"every_steps": 2})
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(cfg)


def test_cache_equals_on_the_fly_and_stale_cache_is_rebuilt(tmp_path, train_assets, train_shards):
    from t2i_recap import prepare

    shards, side = train_shards
    cache_dir = tmp_path / "cache"
    raw = train_config_dict(train_assets, shards, tmp_path / "fly", side, trainer={"max_steps": 3},
                            checkpoint={"every_steps": 3})
    cached = train_config_dict(train_assets, shards, tmp_path / "cached", side, trainer={"max_steps": 3},
                               checkpoint={"every_steps": 3}, features={"cache_dir": str(cache_dir)})
    cfg_file = write_config(tmp_path / "cached.yaml", cached)
    assert prepare.main(["--config", str(cfg_file)]) == 0
    train(from_dict(TrainConfig, raw))
    train(from_dict(TrainConfig, cached))
    _assert_close(_tensors(tmp_path / "fly", 3, "model"), _tensors(tmp_path / "cached", 3, "model"), atol=1e-5)

    import pyarrow.parquet as pq

    from t2i_recap import cache
    from t2i_recap.data import build_source

    cfg = from_dict(TrainConfig, cached)
    enc = cache.FeatureEncoder(cfg.features, cfg.text_encoder)
    src = build_source(cfg.data)
    assert cache.prepare_cache(enc, src, cfg.data, cache_dir)["fresh"] == 2  # nothing changed: reused
    os.utime(side / "00001.parquet", ns=(1, 1))  # touched, same content: still fresh
    assert cache.prepare_cache(enc, src, cfg.data, cache_dir)["fresh"] == 2
    table = pq.read_table(side / "00001.parquet")  # a re-run captioner rewrote one sidecar (same rows)
    pq.write_table(table.replace_schema_metadata({"captioner": "rerun"}), side / "00001.parquet")
    assert cache.prepare_cache(enc, src, cfg.data, cache_dir)["built"] == 1
    shorter = from_dict(TrainConfig, {**cached, "text_encoder": {**cached["text_encoder"], "max_length": 16}})
    enc2 = cache.FeatureEncoder(shorter.features, shorter.text_encoder)
    assert cache.prepare_cache(enc2, src, shorter.data, cache_dir)["built"] == 2  # new fingerprint: all stale
    with pytest.raises(RuntimeError, match="fingerprint"):
        cache.CacheSource(cache_dir, src.shards, cache.fingerprint_hash(enc.fingerprint(cfg.data)))


GENERATE = textwrap.dedent("""
    import json, sys
    from diffusers import DiffusionPipeline
    from t2i_recap.generation import generate_images
    out = {}
    for path in sys.argv[1:]:
        pipe = DiffusionPipeline.from_pretrained(path)
        s = json.load(open(path + "/t2i_recap.json"))
        imgs = generate_images(pipe, ["a red circle", "two blue squares"], [0, 1], num_inference_steps=3,
                               guidance_scale=s["guidance_scale"], resolution=s["resolution"],
                               max_sequence_length=s["max_sequence_length"], batch_size=2)
        again = generate_images(pipe, ["a red circle"], [0], num_inference_steps=3, guidance_scale=s["guidance_scale"],
                                resolution=s["resolution"], max_sequence_length=s["max_sequence_length"])
        out[s["objective"]] = {"cls": type(pipe).__name__, "sizes": [im.size for im in imgs],
                               "differ": imgs[0].tobytes() != imgs[1].tobytes(),
                               "repeat": imgs[0].tobytes() == again[0].tobytes()}
    print(json.dumps(out))
""")


def test_export_generates_in_a_fresh_process(tmp_path, train_assets, train_shards):
    from t2i_recap.export import main as export_main

    outs = []
    for objective in ("rectified_flow", "ddpm"):
        run = tmp_path / objective
        train(_cfg(train_assets, train_shards, run, objective={"name": objective}, trainer={"max_steps": 2},
                   checkpoint={"every_steps": 2}, validation={"every_steps": 0}))
        assert list((run / "samples").glob("step-*.png"))  # the validation grid at the end
        out = tmp_path / f"export-{objective}"
        assert export_main(["--run", str(run), "--out", str(out)]) == 0
        settings = json.loads((out / "t2i_recap.json").read_text())
        assert {"resolution", "max_sequence_length", "objective", "num_inference_steps", "guidance_scale"} <= set(settings)
        card = (out / "README.md").read_text()
        assert "Data provenance" in card and str(train_shards[0]) in card and "mixing" in card
        outs.append(str(out))
    with pytest.raises(FileExistsError):
        export_main(["--run", str(tmp_path / "ddpm"), "--out", outs[1]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", GENERATE, *outs], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for objective in ("rectified_flow", "ddpm"):
        assert got[objective]["cls"] == "PixArtAlphaPipeline"
        assert got[objective]["sizes"] == [[16, 16], [16, 16]]
        assert got[objective]["differ"] and got[objective]["repeat"]


def test_a_failing_validation_never_loses_the_run(tmp_path, train_assets, train_shards, monkeypatch):
    """A validation grid that raises (a bad prompt, a dtype slip, out of memory) is logged and reported;
    training goes on to its last step and every checkpoint is written."""
    from t2i_recap import trainer as trainer_mod

    def broken(self, model):
        raise RuntimeError("Input type (float) and bias type (c10::BFloat16) should be the same")

    monkeypatch.setattr(trainer_mod.Trainer, "_generate", broken)
    run = tmp_path / "run"
    cfg = _cfg(train_assets, train_shards, run, trainer={"max_steps": 4}, checkpoint={"every_steps": 2},
               validation={"every_steps": 2})
    summary = train(cfg)
    assert summary["step"] == 4
    assert [f["step"] for f in summary["validation_failures"]] == [2, 4]
    assert "c10::BFloat16" in summary["validation_failures"][0]["error"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert json.loads((run / "summary.json").read_text())["validation_failures"] == summary["validation_failures"]


def test_checkpoint_files_get_the_umask_mode(tmp_path, train_assets, train_shards):
    from t2i_recap.io import file_mode

    run = tmp_path / "run"
    train(_cfg(train_assets, train_shards, run, trainer={"max_steps": 2}, checkpoint={"every_steps": 2}))
    files = list((run / "checkpoints" / "step-00000002").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(file_mode()) for f in files}
