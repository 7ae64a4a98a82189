"""Captioner fine-tune / fidelity / stats fixtures: a tiny random CLIP at the shapes resolution
and a fast fine-tune config (the real tiny CLIP comes from `t2i-recap shapes assets`; a random one
exercises the same from_pretrained path in a second)."""

from __future__ import annotations

import pytest

CAPTIONER_RES = 32
# Small enough for a few CPU steps per test: 16 image tokens (patch 8), a 1-layer decoder.
FAST_FINETUNE = [
    "build.hidden_size=32", "build.num_layers=1", "build.num_heads=2", "build.intermediate_size=64",
    "build.max_position_embeddings=256", "train.epochs=1", "train.batch_size=8", "train.warmup_steps=1",
]


def build_captioner_clip(out, tokenizer_dir, seed: int = 0, max_positions: int = 77):
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=max_positions, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=CAPTIONER_RES, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    crop = {"height": CAPTIONER_RES, "width": CAPTIONER_RES}
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": CAPTIONER_RES}, crop_size=crop),
                         tokenizer=tok)
    model.save_pretrained(str(out))
    proc.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def captioner_clip_dir(tmp_path_factory, shapes_tokenizer_dir):
    return build_captioner_clip(tmp_path_factory.mktemp("captioner_clip"), shapes_tokenizer_dir)
