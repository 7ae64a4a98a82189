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
    from fixtures_core import build_tiny_clip

    return build_tiny_clip(out, tokenizer_dir, resolution=CAPTIONER_RES, vision_layers=2,
                           max_positions=max_positions, seed=seed)


@pytest.fixture(scope="session")
def captioner_clip_dir(tmp_path_factory, shapes_tokenizer_dir):
    return build_captioner_clip(tmp_path_factory.mktemp("captioner_clip"), shapes_tokenizer_dir)
