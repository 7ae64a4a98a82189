"""Captioner fixtures: tiny random captioners saved in HF format, small shards, hostile inputs,
and a tiny checkpoint in the original LLaVA repository's layout."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import types
import zlib
from pathlib import Path

import pytest

CAPTIONER_SHARDS = 4
CAPTIONER_SHARD_SIZE = 5


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, shapes_tokenizer_dir):
    from t2i_recap.captioner.tiny import tiny_llava

    return tiny_llava(tmp_path_factory.mktemp("tiny_llava"), tokenizer_dir=shapes_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory, shapes_tokenizer_dir):
    from t2i_recap.captioner.tiny import tiny_idefics3

    return tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"), tokenizer_dir=shapes_tokenizer_dir)


@pytest.fixture(scope="session")
def captioner_shards(tmp_path_factory):
    """20 shapes samples in 4 img2dataset shards of 5 (read-only)."""
    from t2i_recap.shapes.make import make_dataset

    out = tmp_path_factory.mktemp("captioner_shards")
    make_dataset(out, CAPTIONER_SHARDS * CAPTIONER_SHARD_SIZE, seed=3, curated_fraction=0.25,
                 shard_size=CAPTIONER_SHARD_SIZE, progress=False)
    return out


# ---------------------------------------------------------------- hostile inputs


def encode(img, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def hostile_images() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes) for every bad-image case of the issue."""
    import numpy as np
    from PIL import Image

    good = Image.new("RGB", (24, 16), (200, 40, 40))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise), "JPEG", quality=90)  # header intact, scan data cut
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (4, 4, 12, 12))
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))
    return {
        "good": ("png", encode(good, "PNG")),
        "truncated": ("jpg", jpeg[: len(jpeg) * 2 // 3]),
        "zerobyte": ("jpg", b""),
        "notimage": ("jpg", b"<html>this is not an image</html>"),
        "bomb": ("png", png_header_only(20000, 20000)),
        "cmyk": ("jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")),
        "sixteenbit": ("png", encode(sixteen, "PNG")),
        "palette": ("png", encode(pal, "PNG", transparency=0)),
        "animated": ("gif", gif.getvalue()),
    }


# key -> expected ("ok", note substring) or ("skipped", error substring)
HOSTILE_EXPECT = {
    "good": ("ok", None),
    "truncated": ("skipped", "truncated"),
    "zerobyte": ("skipped", "zero-byte"),
    "notimage": ("skipped", "not a recognised image"),
    "bomb": ("skipped", "decompression bomb"),
    "cmyk": ("ok", "CMYK converted"),
    "sixteenbit": ("ok", "rescaled to 8-bit"),
    "palette": ("ok", "transparency composited"),
    "animated": ("ok", "first of 3 frames"),
    "nocaption": ("ok", "no original caption"),
    "latin1": ("ok", "not valid UTF-8"),
    "hugecaption": ("ok", "caption cut"),
    "noimage": ("skipped", "no image member"),
    "link": ("skipped", "not a regular file"),
}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def hostile_shard(tmp_path_factory):
    """One tar shard holding every bad-input case; returns its folder."""
    out = tmp_path_factory.mktemp("hostile")
    images = hostile_images()
    png = images["good"][1]
    with tarfile.open(out / "00000.tar", "w") as tar:
        for key, (ext, data) in images.items():
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", f"a picture called {key}".encode())
        _add(tar, "nocaption.png", png)
        _add(tar, "latin1.png", png)
        _add(tar, "latin1.txt", "caf\u00e9 latte".encode("latin-1"))
        _add(tar, "hugecaption.png", png)
        _add(tar, "hugecaption.json", json.dumps({"caption": "word " * 30000}).encode())
        _add(tar, "noimage.txt", b"a caption without its image")
        _add(tar, "../escape.png", png)
        _add(tar, "sub/dir.png", png)
        _add(tar, "bad key.png", png)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "good.png", png)  # the same key again, later in the shard
    return out


# ---------------------------------------------------------------- the original LLaVA layout


@pytest.fixture(scope="session")
def original_llava(tmp_path_factory, shapes_tokenizer_dir):
    return write_original_llava(tmp_path_factory.mktemp("original_llava"), shapes_tokenizer_dir)


def write_original_llava(root: Path, tokenizer_dir, include_tower: bool = True):
    """A tiny `llava_llama` checkpoint as haotian-liu/LLaVA saves one; returns its modules for reference."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from t2i_recap.captioner.tiny import base_tokenizer

    torch.manual_seed(0)
    tower_dir, src = root / "clip_tower", root / "llava_orig"
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower_dir)
    tok = base_tokenizer(tokenizer_dir)
    tok.save_pretrained(src)
    # Different widths for tower (32) and decoder (48) catch a transposed projector.
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id)).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48)).eval()
    state = dict(llama.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if include_tower:  # transformers 4.x names, as in the released checkpoints
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = llama.config.to_dict()
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": str(tower_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    })
    (src / "config.json").write_text(json.dumps(config, indent=2))
    return types.SimpleNamespace(src=src, tower_dir=tower_dir, tower=tower, llama=llama, projector=projector,
                                 num_tensors=len(state))
