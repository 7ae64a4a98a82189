"""A randomly initialised CLIPModel and its processor, sized by ClipModelConfig."""

from __future__ import annotations

from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerBase

from t2i_recap.clip.config import ClipModelConfig
from t2i_recap.shapes.train_clip import build_image_processor


def load_tokenizer(cfg: ClipModelConfig) -> PreTrainedTokenizerBase:
    if not cfg.tokenizer:
        raise ValueError("model.tokenizer is not set: name a tokenizer folder")
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    tok.model_max_length = cfg.text_max_length
    return tok


def build_model(cfg: ClipModelConfig, tokenizer: PreTrainedTokenizerBase) -> CLIPModel:
    """CLIPModel whose text tower pools at the tokenizer's eos (pad == eos as in OpenAI CLIP)."""
    config = CLIPConfig(
        text_config=dict(hidden_size=cfg.text_hidden_size, intermediate_size=cfg.text_hidden_size * cfg.mlp_ratio,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.text_num_heads,
                         vocab_size=len(tokenizer), max_position_embeddings=cfg.text_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * cfg.mlp_ratio,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3),
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


def build_processor(cfg: ClipModelConfig) -> CLIPImageProcessor:
    return build_image_processor(cfg.image_size, list(cfg.image_mean), list(cfg.image_std))
