"""The captioner `t2i-recap caption finetune` trains: a new LLaVA assembled from a CLIP's vision
tower + a fresh MLP projector + a fresh small LLaMA decoder (`build_captioner`), or an existing
LLaVA folder; which parts train (LoRA through peft on the decoder); the answer loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .chat_templates import vicuna_template
from .finetune_config import BuildConfig, FinetuneConfig, LoraSettings
from .finetune_data import Example

IMAGE_TOKEN = "<image>"


def build_captioner(cfg: BuildConfig):
    """Assemble a LLaVA captioner: `cfg.clip`'s vision tower (its weights), a fresh MLP projector
    and a fresh LLaMA decoder over the tokenizer plus an `<image>` token. Returns (model, processor)."""
    from transformers import (AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if not cfg.clip:
        raise ValueError("build.clip is empty: pass --clip DIR (a CLIP model folder) or --model DIR")
    vision = _quietly(CLIPVisionModel.from_pretrained, cfg.clip)  # its report lists every text-tower key
    tokenizer = _captioner_tokenizer(AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.clip), cfg)
    vcfg = vision.config
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(
        vision_config=vcfg, text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(cfg.clip), tokenizer=tokenizer,
        patch_size=vcfg.patch_size, vision_feature_select_strategy="default", chat_template=vicuna_template(system=""),
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1)  # +1: CLIP's CLS, dropped by "default"
    return model, processor


def _quietly(fn, *args):
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args)
    finally:
        hf_logging.set_verbosity(level)


def _captioner_tokenizer(tokenizer, cfg: BuildConfig):
    """The decoder's tokenizer: + `<image>`, a pad token, left padding, BOS only."""
    from tokenizers import processors

    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise ValueError("the captioner's tokenizer needs bos and eos tokens")
    # LLaMA-style: the tokenizer adds BOS and nothing else. A CLIP-style post-processor would also
    # append EOS after the prompt, telling the decoder the answer is over before it starts.
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    tokenizer.model_max_length = cfg.max_position_embeddings
    # A CLIP tokenizer may carry call defaults (max_length 77, truncation) for its text tower;
    # the processor applies them to every prompt, silently cutting the image + prompt sequence.
    for key in ("max_length", "truncation_strategy", "truncation"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # batched generation needs it
    return tokenizer


def load_captioner(path: str | Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path)), AutoProcessor.from_pretrained(str(path))


def llava_of(model):
    """The LlavaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def cache_vision_features(model, examples: list[Example], chunk: int = 256) -> None:
    """A frozen vision tower gives the same features every epoch: compute them once (LLaVA's
    selection: `vision_feature_layer`, CLS dropped by the "default" strategy) and drop the pixels."""
    llava = llava_of(model)
    cfg = llava.config
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    tower = llava.model.vision_tower
    for i in range(0, len(examples), chunk):
        part = examples[i : i + chunk]
        pixels = torch.stack([e.pixel_values for e in part]).to(tower.device)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[k] for k in layers], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        for e, f in zip(part, feats.cpu()):
            e.vision, e.pixel_values = f.clone(), None


def forward(model, batch: dict) -> torch.Tensor:
    """The answer loss (mean next-token cross-entropy over the labelled tokens, as transformers'
    causal-LM loss). Cached vision features go through the (trainable) projector here. Logits are
    made only where a label is: the prompt and image tokens (two thirds of the shapes captioner's
    sequence) never reach the vocabulary projection."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    batch = dict(batch)
    labels = batch.pop("labels")
    llava = llava_of(model)
    feats = batch.pop("vision_features", None)
    if feats is not None:
        projected = llava.model.multi_modal_projector(feats)
        batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
    hidden = llava.model(**batch, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = llava.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


# ----------------------------------------------------------------------------- training

def set_trainable(model, cfg: FinetuneConfig):
    """Freeze or unfreeze the three parts; with LoRA wrap the decoder in adapters. Returns the model."""
    o = cfg.train
    parts = {"vision_tower": not o.freeze_vision, "multi_modal_projector": o.train_projector,
             "language_model": o.train_language_model and not cfg.lora.enabled}
    for name, param in model.named_parameters():
        param.requires_grad = any(f".{part}." in f".{name}" and on for part, on in parts.items())
    if model.lm_head.weight is not None:
        model.lm_head.weight.requires_grad = parts["language_model"]
    if cfg.lora.enabled and o.train_language_model:
        model = _add_lora(model, cfg.lora)
    return model


def _add_lora(model, settings: LoraSettings):
    from t2i_recap.extras import require

    require("peft", extra="caption", why="lora.enabled: true")
    from peft import LoraConfig, get_peft_model

    # Adapters only inside the decoder: the vision tower has q/k/v projections with the same names.
    targets = "|".join(settings.target_modules)
    pattern = rf".*language_model.*\.({targets})"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    model = get_peft_model(model, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                             target_modules=pattern, bias="none"))
    for name, param in model.named_parameters():  # peft froze everything else; restore the projector etc.
        if any(name.endswith(t) for t in trainable):
            param.requires_grad = True
    return model
