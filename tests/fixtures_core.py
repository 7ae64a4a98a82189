"""Core fixtures: the shapes tokenizer (fast to build, deterministic)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shapes_tokenizer_dir(tmp_path_factory):
    from t2i_recap.shapes.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


def build_tiny_clip(out, tokenizer_dir, *, resolution: int, vision_layers: int = 1, max_positions: int = 77,
                    seed: int = 0):
    """A random tiny CLIPModel + CLIPProcessor over the shapes tokenizer, saved like a hub folder."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=max_positions, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                  image_size=resolution, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    crop = {"height": resolution, "width": resolution}
    image_processor = CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size=crop)
    model.save_pretrained(str(out))
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(out))
    return out
