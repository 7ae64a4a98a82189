"""Tiny random captioners in standard transformers folders, for smoke tests and CPU benchmarks.

They load through exactly the `from_pretrained` calls a real checkpoint uses (AutoProcessor +
AutoModelForImageTextToText), so the whole pipeline runs on a laptop in seconds. Their captions
are noise: the trained tiny captioner (`t2i-recap caption finetune`) is the one that describes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .chat_templates import vicuna_template

IMAGE_TOKEN = "<image>"
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def base_tokenizer(tokenizer_dir: str | Path | None = None, bos_only: bool = True):
    """The shapes BPE tokenizer with a LLaMA-like post-processor (BOS, no EOS) and a longer context."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from t2i_recap.shapes.tokenizer import build_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else build_tokenizer()
    if bos_only:
        # A prompt must not end in EOS (the CLIP-style template appends one): the model would stop.
        bos = tok.bos_token
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
        )
    tok.model_max_length = 2048
    return tok


def tiny_llava(out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, seed: int = 0,
               image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2) -> Path:
    """A random LLaVA-1.5-shaped model (CLIP tower, 2-layer GELU projector, LLaMA decoder) + processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out_dir)
    tok = base_tokenizer(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _set_generation(model, tok)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP CLS
                               chat_template=vicuna_template(system=""))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_qwen2vl(out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, seed: int = 0,
                 hidden: int = 32, layers: int = 2) -> Path:
    """A random Qwen2-VL-shaped model (its own ViT with 2x2 patch merging, M-RoPE decoder) + processor."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                              Qwen2VLProcessor)

    out = Path(out_dir)
    tok = base_tokenizer(tokenizer_dir, bos_only=False)
    tok._tokenizer.post_processor = None  # Qwen adds no BOS/EOS; the template carries the turns
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = hidden // 2
    config = Qwen2VLConfig(
        vision_config=dict(depth=layers, embed_dim=hidden, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 8, head_dim // 8 + head_dim // 16,
                                                            head_dim // 2 - head_dim // 8 - (head_dim // 8 + head_dim // 16)]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    tok.eos_token = "<|im_end|>"
    _set_generation(model, tok)
    # 28x28 px per merged token: a 56x56 image is 4 visual tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
IDEFICS3_TEMPLATE = (
    "{%- for m in messages -%}{{ m['role'] | capitalize }}:"
    "{%- if m['content'] is string -%}{{ ' ' + m['content'] }}{%- else -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<image>' }}{%- elif c['type'] == 'text' -%}{{ ' ' + c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<end_of_utterance>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def tiny_idefics3(out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, seed: int = 0,
                  image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2) -> Path:
    """A random Idefics3/SmolVLM-shaped model (SigLIP tower, pixel-shuffle connector, LLaMA decoder) + processor.

    A second family next to LLaVA whose processor needs no torchvision (Qwen2-VL's video processor does).
    """
    import transformers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    out = Path(out_dir)
    tok = base_tokenizer(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIALS})
    scale = 2
    config = Idefics3Config(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    _set_generation(model, tok)
    # The PIL image processor: the default one needs torchvision.
    image_cls = getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor
    image_processor = image_cls(size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
                                do_image_splitting=False)
    seq_len = (image_size // patch_size) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                                  chat_template=IDEFICS3_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _set_generation(model, tok) -> None:
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.do_sample = False
