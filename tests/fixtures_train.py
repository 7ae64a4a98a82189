"""Trainer fixtures: tiny random CLIP text encoder + VAE saved with save_pretrained, small shapes shards
(with recaption sidecars), and a config writer. Everything loads back through from_pretrained, as
real checkpoints do."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

TRAIN_RES = 16


def build_tiny_encoders(out: Path, tokenizer_dir: Path) -> Path:
    """DIR/clip (CLIPTextModel + tokenizer) and DIR/vae (AutoencoderKL, 2x downsampling)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    clip_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    CLIPTextModel(clip_cfg).save_pretrained(str(out / "clip"))
    tok.save_pretrained(str(out / "clip"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=TRAIN_RES, scaling_factor=0.5)
    vae.save_pretrained(str(out / "vae"))
    return out


def write_shards(out: Path, *, num_shards: int = 2, per_shard: int = 12, seed: int = 0, resolution: int = TRAIN_RES,
                 sidecar_dir: Path | None = None, failed_every: int = 5) -> list[Path]:
    """img2dataset-layout shards of rendered scenes: .png, .txt (web caption), .json (gold_caption);
    with `sidecar_dir`, a recaption parquet per shard whose every `failed_every`-th row failed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2i_recap.shapes.captions import gold_caption, web_caption
    from t2i_recap.shapes.render import render
    from t2i_recap.shapes.world import sample_scene

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = out / f"{s:05d}.tar"
        rows = []
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                scene = sample_scene(rng)
                buf = io.BytesIO()
                render(scene, resolution).save(buf, format="PNG")
                gold, web = gold_caption(scene, rng), web_caption(scene, rng)
                meta = {"key": key, "caption": web, "status": "success", "gold_caption": gold,
                        "scene": scene.to_dict()}
                for ext, data in (("png", buf.getvalue()), ("txt", web.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                ok = (i % failed_every) != failed_every - 1
                rows.append({"key": key, "org_caption": web, "re_caption": gold if ok else None,
                             "status": "success" if ok else "error"})
        if sidecar_dir is not None:
            sidecar_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), sidecar_dir / f"{s:05d}.parquet")
        paths.append(path)
    return paths


def train_config_dict(assets: Path, shards: Path, run_dir: Path, sidecars: Path | None = None, **sections) -> dict:
    """A tiny, fast training config over the fixtures; `sections` override whole keys per section."""
    cfg = {
        "data": {"shards": str(shards), "resolution": TRAIN_RES, "shuffle_buffer": 8,
                 "original_caption": "txt", "recaption": "sidecar:re_caption" if sidecars else "json:gold_caption",
                 "recaption_dir": str(sidecars) if sidecars else None},
        "mixing": {"p": 0.0, "cfg_dropout": 0.1},
        "text_encoder": {"name_or_path": str(assets / "clip")},
        "features": {"vae": str(assets / "vae"), "dtype": "float32"},
        "model": {"name": "DiT-tiny/2"},
        "objective": {"name": "rectified_flow"},
        "optim": {"lr": 1e-3},
        "ema": {"enabled": True, "decay": 0.9},
        "trainer": {"run_dir": str(run_dir), "max_steps": 4, "batch_size": 4, "micro_batch_size": 2,
                    "mixed_precision": "no", "log_every": 1},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "validation": {"every_steps": -1, "prompts": ["a red circle"], "seeds": [0], "num_inference_steps": 2},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory, shapes_tokenizer_dir):
    return build_tiny_encoders(tmp_path_factory.mktemp("train_assets"), shapes_tokenizer_dir)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """(shard folder, sidecar folder): 2 shards x 12 samples at 16 px."""
    root = tmp_path_factory.mktemp("train_shards")
    write_shards(root / "shards", sidecar_dir=root / "sidecars")
    return root / "shards", root / "sidecars"


@pytest.fixture
def copy_tree():
    return lambda src, dst: shutil.copytree(src, dst)
