"""Synthetic inputs for the benchmarks: web-like JPEG shards, random encoders of real widths, a feature cache.

Nothing is downloaded. The shards follow img2dataset's webdataset layout (docs/references.md section 2:
`<key>.jpg`, `<key>.txt` = original alt-text, `<key>.json` with `re_caption`). The encoders are
random and shallow but as WIDE as the real ones (CLIP-L text 768, T5-XXL 4096, an 8x VAE with 4
latent channels), so every cached tensor has its real shape and byte size; their depth only changes
how long the cache takes to build, which no benchmark here reports as a training number. The cache
is built by the project's own `t2i_recap.cache.prepare_cache`, so its format is the trainer's.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("a photo of the red blue green small large dog cat car tree house street city beach mountain "
         "sunset person woman man child table chair window light dark wooden metal old new with on near "
         "under behind left right top bottom white black yellow sky water grass field road building").split()
# name -> (encoder family, hidden width, tokens): the text-feature shapes of the train-step benchmark.
TEXT_ENCODERS = {"clip-l": ("clip", 768, 77), "t5-xxl": ("t5", 4096, 120), "clip-tiny": ("clip", 64, 77)}


def _caption(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: compresses like a photo (tens of kB at 512 px), unlike pure noise."""
    base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def write_shards(out: Path, *, samples: int, shards: int, image_size: int, seed: int = 0,
                 quality: int = 90) -> list[Path]:
    """`shards` tar files of `samples` JPEGs in total, landscape 4:3 with the long side `image_size`."""
    out.mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    w, h = image_size, image_size * 3 // 4
    paths = []
    per = -(-samples // shards)
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        paths.append(path)
        if path.is_file():
            continue
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(min(per, samples - s * per)):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                _image(nrng, w, h).save(buf, format="JPEG", quality=quality)
                org, recap = _caption(rng, 10), _caption(rng, 49)  # docs/references.md: mean lengths 10.22 and 49.43
                meta = {"key": key, "caption": org, "org_caption": org, "re_caption": recap, "status": "success",
                        "width": w, "height": h, "error_message": None}
                for ext, data in (("jpg", buf.getvalue()), ("txt", org.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.replace(path)
    return paths


def write_encoders(out: Path, text: str = "clip-l") -> tuple[Path, Path]:
    """(text encoder folder, VAE folder): random, shallow, real widths, loadable with from_pretrained."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from t2i_recap.shapes.tokenizer import build_tokenizer

    family, width, tokens = TEXT_ENCODERS[text]
    text_dir, vae_dir = out / text, out / "vae-8x"
    torch.manual_seed(0)
    if not (text_dir / "config.json").is_file():
        tok = build_tokenizer()
        if family == "clip":
            cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=1,
                                 num_attention_heads=max(1, width // 64), max_position_embeddings=tokens,
                                 projection_dim=width, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            CLIPTextModel(cfg).save_pretrained(text_dir)
        else:
            cfg = T5Config(vocab_size=len(tok), d_model=width, d_kv=64, d_ff=256, num_layers=1, num_heads=2,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            T5EncoderModel(cfg).save_pretrained(text_dir)
        tok.model_max_length = tokens
        tok.save_pretrained(text_dir)
    if not (vae_dir / "config.json").is_file():
        # Four blocks = 8x downsampling to 4 latent channels, as SD's VAE; narrow, so CPUs encode it quickly.
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                      layers_per_block=1, latent_channels=4, norm_num_groups=8,
                      scaling_factor=0.18215).save_pretrained(vae_dir)
    return text_dir, vae_dir


def configs(shards: Path, text_dir: Path, vae_dir: Path, cache_dir: Path, resolution: int = 256):
    """The trainer's own config sections for these inputs (original = .txt, recaption = json:re_caption)."""
    from t2i_recap.cache import FeaturesConfig
    from t2i_recap.data import DataConfig
    from t2i_recap.text_encoders import TextEncoderConfig

    data = DataConfig(shards=str(shards), original_caption="txt", recaption="json:re_caption",
                      resolution=resolution, image_extensions=["jpg"])
    features = FeaturesConfig(vae=str(vae_dir), dtype="float16", cache_dir=str(cache_dir), encode_batch_size=32)
    return data, features, TextEncoderConfig(name_or_path=str(text_dir))


def build_cache(shards: Path, text_dir: Path, vae_dir: Path, cache_dir: Path, *, resolution: int = 256,
                device: str = "cpu"):
    """Build (or reuse, when fresh) the feature cache with the project's code; returns a CacheSource."""
    from t2i_recap import cache
    from t2i_recap.data import build_source

    data, features, text_cfg = configs(shards, text_dir, vae_dir, cache_dir, resolution)
    encoder = cache.FeatureEncoder(features, text_cfg, device)
    fp_hash = cache.write_fingerprint(encoder, data, cache_dir)
    raw = build_source(data)
    cache.prepare_cache(encoder, raw, data, cache_dir, fp_hash=fp_hash)
    return cache.CacheSource(cache_dir, raw.shards, fp_hash)
