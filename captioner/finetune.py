"""`t2i-recap caption finetune`: train a LLaVA-architecture captioner on (image, caption) pairs.

The paper's captioner is LLaVA-1.5 (CLIP vision tower, frozen; `mlp2x_gelu` projector; LLaMA-3
decoder), fine-tuned on image-caption pairs (docs/references.md section 1). This module fine-tunes any
`LlavaForConditionalGeneration` folder, fully or with LoRA (peft), or first assembles a new one
from a CLIP model's vision tower + a fresh 2-layer MLP projector + a fresh small LLaMA decoder
(`build_captioner`): that is how the shapes world gets its tiny captioner. Either way the result
is a standard transformers folder (model + `LlavaProcessor` with its chat template) that
`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load.

The loss covers the answer tokens only (prompt and image tokens are masked with -100), and the
prompt is the one recaptioning uses (`build_prompt(preset)`, the paper's prompt by default), put
through the processor's chat template, so training and inference see the same token sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from t2i_recap.config import load_config, save_config, to_dict
from t2i_recap.io import atomic_write_text, check_replaceable, expand_shards, output_dir
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.shards import iter_tar_samples

from .chat_templates import vicuna_template
from .images import BadImage, decode_image

log = get_logger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclasses.dataclass
class DataConfig:
    shards: str = ""
    """Input shards (folder, glob or brace pattern) in img2dataset webdataset layout."""
    caption_field: str = "gold_caption"
    """Key of the per-sample json holding the target caption, or a list of captions (one training pair
    each, e.g. `gold_captions`); "txt" reads the `.txt` member."""
    curated_only: bool = True
    """Use only samples whose json has `curated: true` (the shapes world's gold subset)."""
    max_samples: int | None = None
    """Stop reading after this many usable pairs (None: all)."""

    def __post_init__(self):
        if not self.caption_field:
            raise ValueError("caption_field must name a json key or be 'txt'")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")


@dataclasses.dataclass
class BuildConfig:
    """A new captioner: a CLIP vision tower + 2-layer MLP projector + a small LLaMA decoder."""

    clip: str = ""
    """Folder of a CLIP model (CLIPVisionModel and its image processor load from it)."""
    tokenizer: str | None = None
    """Tokenizer folder for the decoder (default: the CLIP folder's tokenizer)."""
    hidden_size: int = 128
    """Decoder width."""
    num_layers: int = 2
    """Decoder depth."""
    num_heads: int = 4
    """Decoder attention heads."""
    intermediate_size: int = 512
    """Decoder MLP width."""
    max_position_embeddings: int = 512
    """Longest sequence (image tokens + prompt + caption) the decoder handles."""
    vision_feature_layer: int = -2
    """Vision hidden state fed to the projector (LLaVA-1.5 uses the penultimate layer, -2)."""
    seed: int = 0
    """Seed for the fresh projector and decoder weights."""

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclasses.dataclass
class LoraSettings:
    enabled: bool = False
    """Train LoRA adapters on the decoder instead of all its weights (the projector is trained in full)."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Adapter scale numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Decoder linear layers that get adapters."""
    merge: bool = True
    """Merge adapters into the weights before saving (a plain LLaVA folder); false also keeps them in OUT/adapter."""

    def __post_init__(self):
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"lora r and alpha must be >= 1, got r={self.r} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class TrainSettings:
    epochs: int = 10
    """Passes over the pairs."""
    batch_size: int = 32
    """Pairs per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after warm-up, then cosine decay to 10%."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0: off)."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (LLaVA-1.5 does)."""
    train_projector: bool = True
    """Train the projector."""
    train_language_model: bool = True
    """Train the decoder (in full, or its adapters with LoRA)."""
    max_length: int = 256
    """Longest training sequence in tokens; longer captions are cut (counted in the summary)."""
    max_steps: int | None = None
    """Stop after this many steps (None: run all epochs); the schedule is laid out for the steps run."""
    seed: int = 0
    """Shuffling seed."""
    device: str = "auto"
    """Where to train: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda", "cuda:1"."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 autocast of the forward pass on a GPU (weights and AdamW stay fp32); ignored on the CPU."""

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device={self.device!r}, but torch sees no CUDA GPU here; use auto or cpu")
        return device

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")


@dataclasses.dataclass
class FinetuneConfig:
    model: str | None = None
    """An existing LLaVA folder to fine-tune; None builds a new captioner from `build`."""
    prompt_preset: str = "recap"
    """Prompt preset of `build_prompt` (recap: the paper's prompt, verbatim)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    build: BuildConfig = dataclasses.field(default_factory=BuildConfig)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)


@dataclasses.dataclass
class Pair:
    key: str
    image: Image.Image
    caption: str
    org_caption: str


# ----------------------------------------------------------------------------- building

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


# ----------------------------------------------------------------------------- data

def read_pairs(cfg: DataConfig) -> tuple[list[Pair], Counter]:
    """(image, caption) pairs from the shards; returns them and a Counter of skip reasons."""
    if not cfg.shards:
        raise ValueError("data.shards is empty: pass --shards DIR")
    pairs: list[Pair] = []
    skipped: Counter = Counter()
    for shard in expand_shards(cfg.shards):
        for sample in iter_tar_samples(shard):
            found, reason = _to_pairs(sample, cfg)
            if found is not None:
                pairs.extend(found)
            elif reason != "not curated":
                log.warning("%s/%s skipped: %s", shard.name, sample.key, reason)
            skipped[reason] += found is None
            if cfg.max_samples and len(pairs) >= cfg.max_samples:
                return pairs, +skipped
    return pairs, +skipped


def _to_pairs(sample, cfg: DataConfig) -> tuple[list[Pair] | None, str]:
    """The sample's (image, caption) pairs: one per caption when the field holds a list (COCO-style
    several captions per image, e.g. the shapes world's `gold_captions`), else one."""
    if sample.error:
        return None, sample.error
    try:
        meta = json.loads(sample.files.get("json", b"{}").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable json: {exc}"
    if cfg.curated_only and meta.get("curated") is not True:
        return None, "not curated"
    value = _field(sample.files, meta, cfg.caption_field)
    captions = [c.strip() for c in (value if isinstance(value, list) else [value]) if isinstance(c, str) and c.strip()]
    if not captions:
        return None, f"no caption in field {cfg.caption_field!r}"
    ext = next((e for e in IMAGE_EXTS if e in sample.files), None)
    if ext is None:
        return None, "no image member"
    try:
        image = decode_image(sample.files[ext]).image
    except BadImage as exc:
        return None, str(exc)
    org = _field(sample.files, meta, "txt") or meta.get("caption") or ""
    return [Pair(sample.key, image, c, org) for c in captions], ""


def _field(files: dict, meta: dict, name: str):
    if name == "txt":
        try:
            return files.get("txt", b"").decode("utf-8")
        except UnicodeDecodeError:
            return None
    return meta.get(name)


# ----------------------------------------------------------------------------- batches

def encode_prompts(processor, images: list[Image.Image], prompts: list[str]) -> dict:
    """Image + prompt -> the user turn's ids and pixel values, made exactly as the captioning
    backend makes them (`apply_chat_template`, tokenized), so training sees inference's tokens."""
    conversations = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
                     for img, text in zip(images, prompts)]
    enc = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        processor_kwargs={"padding": False, "truncation": False})
    expected = _expected_lengths(processor, conversations)
    for ids, n in zip(enc["input_ids"], expected):  # a prompt must end where the answer starts
        if len(ids) != n:
            raise ValueError(f"the processor cut a prompt from {n} to {len(ids)} tokens (tokenizer truncation "
                             f"defaults?); it now ends in {processor.tokenizer.decode(ids[-8:])!r}")
    return enc


def _expected_lengths(processor, conversations) -> list[int]:
    """Prompt lengths with no truncation anywhere: the text's tokens plus the expanded image tokens."""
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    texts = [texts] if isinstance(texts, str) else texts
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    n_image = getattr(processor, "num_additional_image_tokens", 0)
    per_image = processor.image_processor.crop_size["height"] // processor.patch_size
    n_image += per_image * per_image - (processor.vision_feature_select_strategy == "default")
    return [len(ids) + ids.count(image_id) * (n_image - 1)
            for ids in tok(texts, add_special_tokens=True, truncation=False)["input_ids"]]


@dataclasses.dataclass
class Example:
    """One encoded training sequence: the prompt (with image tokens) then the answer."""

    input_ids: list[int]
    num_prompt: int
    pixel_values: torch.Tensor | None
    vision: torch.Tensor | None = None  # the frozen tower's selected features, computed once


class Batcher:
    """Pairs -> encoded examples (once, up front) -> padded batches with labels on the answer only."""

    def __init__(self, processor, prompt_preset: str, max_length: int, chunk: int = 64):
        from .prompts import build_prompt

        self.processor, self.tokenizer = processor, processor.tokenizer
        self.prompt_preset, self.build_prompt = prompt_preset, build_prompt
        self.max_length, self.chunk = max_length, chunk
        self.truncated = 0

    def encode(self, pairs: list[Pair]) -> list[Example]:
        out: list[Example] = []
        for i in range(0, len(pairs), self.chunk):
            part = pairs[i : i + self.chunk]
            prompts = [self.build_prompt(self.prompt_preset, p.org_caption) for p in part]
            enc = encode_prompts(self.processor, [p.image for p in part], prompts)
            pixels = torch.as_tensor(np.stack(enc["pixel_values"]))
            out.extend(self._example(list(ids), p.caption, px) for ids, p, px in zip(enc["input_ids"], part, pixels))
        return out

    def _example(self, prompt_ids: list[int], caption: str, pixel_values: torch.Tensor) -> Example:
        # The answer is tokenized on its own, with the space that follows "ASSISTANT:", so the
        # boundary is the one generation continues from.
        answer = self.tokenizer(" " + caption, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        room = self.max_length - len(prompt_ids)
        if room < 2:
            raise ValueError(f"train.max_length {self.max_length} leaves no room for an answer after "
                             f"the {len(prompt_ids)}-token prompt (image tokens included)")
        if len(answer) > room:
            self.truncated += 1
            answer = answer[:room]
        return Example(prompt_ids + answer, len(prompt_ids), pixel_values)

    def collate(self, examples: list[Example]) -> dict:
        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):  # right padding: training has no generation to line up
            ids = torch.tensor(e.input_ids)
            input_ids[i, : len(ids)] = ids
            labels[i, e.num_prompt : len(ids)] = ids[e.num_prompt :]
            mask[i, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if all(e.vision is not None for e in examples):
            batch["vision_features"] = torch.stack([e.vision for e in examples])
        else:
            batch["pixel_values"] = torch.stack([e.pixel_values for e in examples])
        return batch


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


def batches(examples: list, o: TrainSettings):
    """Index lists of one batch each: shuffled epochs, stopping after max_steps if set."""
    rng = random.Random(o.seed)
    steps = 0
    for epoch in range(o.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), o.batch_size):
            if o.max_steps is not None and steps >= o.max_steps:
                return
            steps += 1
            yield epoch, order[i : i + o.batch_size]


def num_steps(num_examples: int, o: TrainSettings) -> int:
    total = math.ceil(num_examples / o.batch_size) * o.epochs
    return min(total, o.max_steps) if o.max_steps is not None else total


def train(model, batcher: Batcher, examples: list[Example], o: TrainSettings) -> dict:
    """The loop: shuffled epochs, AdamW, warm-up + cosine, grad clip. Returns a summary."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: vision tower, projector and language model are all frozen")
    total = num_steps(len(examples), o)
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(o.warmup_steps, total // 2), total, min_lr_rate=0.1)
    model.train()
    losses: list[float] = []
    epoch_losses: dict[int, list[float]] = {}
    start = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step")
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and o.mixed_precision == "bf16")
    for epoch, idx in batches(examples, o):
        batch = {k: v.to(device, non_blocking=True) for k, v in batcher.collate([examples[j] for j in idx]).items()}
        with autocast:
            loss = forward(model, batch)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        epoch_losses.setdefault(epoch, []).append(losses[-1])
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    means = {e: sum(v) / len(v) for e, v in epoch_losses.items()}
    log.info("mean answer loss per epoch: %s", ", ".join(f"{v:.4f}" for v in means.values()))
    return {"steps": total, "epochs_run": len(means), "seconds": round(time.perf_counter() - start, 1),
            "first_loss": losses[0], "final_loss": means[max(means)], "epoch_losses": list(means.values()),
            "trainable_parameters": sum(p.numel() for p in params), "device": str(device)}


OUTPUT_KIND = "captioner"


def _inputs(cfg: FinetuneConfig) -> tuple[str, ...]:
    """Local folders this run reads, which its output must never replace."""
    return tuple(p for p in (cfg.model, cfg.build.clip) if p and Path(p).exists())


def save(model, processor, out: Path, cfg: FinetuneConfig, summary: dict) -> None:
    """Write the folder beside `out` and rename it into place, so `out` is complete or absent; an
    existing `out` is replaced only when it is an earlier fine-tune's output (io.output_dir)."""
    with output_dir(out, kind=OUTPUT_KIND, overwrite=True, protect=_inputs(cfg)) as tmp:
        if cfg.lora.enabled and hasattr(model, "merge_and_unload"):
            if not cfg.lora.merge:
                model.save_pretrained(str(tmp / "adapter"))  # adapter_model.safetensors + adapter_config.json
            model = model.merge_and_unload()
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        save_config(cfg, tmp / "finetune_config.yaml")
        atomic_write_text(tmp / "finetune.json", json.dumps(summary, indent=2, sort_keys=True))


def finetune(cfg: FinetuneConfig, out: str | Path) -> dict:
    """Read pairs, build or load the captioner, train, save to `out`. Returns the summary."""
    out = Path(out)
    check_replaceable(out, kind=OUTPUT_KIND, overwrite=True, protect=_inputs(cfg))  # before training, not after
    pairs, skipped = read_pairs(cfg.data)
    if not pairs:
        raise ValueError(f"{cfg.data.shards}: no usable (image, caption) pairs (skipped: {dict(skipped)})")
    log.info("%d pairs from %s (skipped: %s)", len(pairs), cfg.data.shards, dict(skipped))
    model, processor = load_captioner(cfg.model) if cfg.model else build_captioner(cfg.build)
    model = set_trainable(model, cfg).to(cfg.train.resolved_device())
    batcher = Batcher(processor, cfg.prompt_preset, cfg.train.max_length)
    examples = batcher.encode(pairs)
    if cfg.train.freeze_vision:
        cache_vision_features(model, examples)
    summary = train(model, batcher, examples, cfg.train)
    summary.update(pairs=len(pairs), skipped=dict(skipped), captions_truncated=batcher.truncated,
                   lora=("merged" if cfg.lora.merge else "merged + adapter/") if cfg.lora.enabled else None,
                   config=to_dict(cfg))
    save(model.cpu(), processor, out, cfg, summary)
    log.info("saved the captioner to %s (final answer loss %.4f, %.0f s)", out, summary["final_loss"],
             summary["seconds"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2i-recap caption finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file (configs/caption/finetune_*.yaml)")
    parser.add_argument("--shards", help="training shards (sets data.shards)")
    parser.add_argument("--clip", help="CLIP folder for a new captioner (sets build.clip)")
    parser.add_argument("--model", help="existing LLaVA folder to fine-tune (sets model)")
    parser.add_argument("--out", required=True, help="output folder (a transformers model folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if OUT holds a finished run")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = list(args.set)
    for flag, key in ((args.shards, "data.shards"), (args.clip, "build.clip"), (args.model, "model")):
        if flag:
            overrides.append(f"{key}={json.dumps(flag)}")
    cfg = load_config(FinetuneConfig, args.config, overrides)
    if (Path(args.out) / "finetune.json").is_file() and not args.overwrite:
        print(f"{args.out} already holds a finished fine-tune (finetune.json); pass --overwrite to retrain")
        return 0
    summary = finetune(cfg, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
