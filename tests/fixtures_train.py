"""Trainer fixtures: tiny random CLIP text encoder + VAE saved with save_pretrained, small shapes shards
(with recaption sidecars), and a config writer. Everything loads back through from_pretrained, as
real checkpoints do."""

from __future__ import annotations

import json
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


def write_sidecars(shards: Path, sidecar_dir: Path, failed_every: int = 5) -> Path:
    """Recaption sidecars in the captioner's format for shapes shards: re_caption = the gold caption,
    every `failed_every`-th row failed (status "error", no recaption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2i_recap.shards import iter_tar_samples

    sidecar_dir.mkdir(parents=True, exist_ok=True)
    for tar in sorted(shards.glob("*.tar")):
        rows = []
        for i, raw in enumerate(iter_tar_samples(tar)):
            meta = json.loads(raw.files["json"])
            ok = (i % failed_every) != failed_every - 1
            rows.append({"key": raw.key, "org_caption": meta["caption"], "re_caption": meta["gold_caption"] if ok else None,
                         "re_length": len(meta["gold_caption"].split()) if ok else None, "status": "success" if ok else "error"})
        table = pa.Table.from_pylist(rows).replace_schema_metadata({"captioner": "fixture: gold captions"})
        pq.write_table(table, sidecar_dir / f"{tar.stem}.parquet")
    return sidecar_dir


def write_shards(out: Path, *, num: int = 24, shard_size: int = 12, seed: int = 0, resolution: int = TRAIN_RES,
                 sidecar_dir: Path | None = None) -> Path:
    """Shapes shards (every sample curated, so its json holds a gold caption) + optional sidecars."""
    from t2i_recap.shapes.make import make_dataset

    make_dataset(out, num, seed=seed, curated_fraction=1.0, resolution=resolution, shard_size=shard_size,
                 progress=False)
    if sidecar_dir is not None:
        write_sidecars(out, sidecar_dir)
    return out


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
def one_thread():
    """Tiny models on a shared 2-core box run faster (and steadier) on one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
