"""The fine-tuning data of `t2i-recap caption finetune`: (image, caption) pairs read from shards,
encoded exactly as the captioning backend encodes a prompt, and batched with labels on the answer only.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import torch
from PIL import Image

from t2i_recap.io import expand_shards
from t2i_recap.logging_utils import get_logger
from t2i_recap.shards import iter_tar_samples

from .finetune_config import FinetuneDataConfig
from .images import BadImage, decode_image

log = get_logger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclasses.dataclass
class Pair:
    key: str
    image: Image.Image
    caption: str
    org_caption: str


def read_pairs(cfg: FinetuneDataConfig) -> tuple[list[Pair], Counter]:
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


def _to_pairs(sample, cfg: FinetuneDataConfig) -> tuple[list[Pair] | None, str]:
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
