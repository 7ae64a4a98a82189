"""CLIP score through torchmetrics' `CLIPScore`, with a local CLIP and honest text truncation.

torchmetrics takes a callable returning `(model, processor)` for local models (a string name
must contain "openai"/"jinaai"/"zer0int"; docs/references.md section 5). Two things are fixed here:

* truncation: torchmetrics cuts token ids past the model's position table *after* tokenizing,
  which drops the end-of-text token that CLIP pools from, so a long prompt scores from the
  wrong token. The processor returned here truncates in the tokenizer (keeping the end token),
  and every prompt longer than the table is counted and reported. A CLIP with a longer table
  (Long-CLIP: 248 positions) is used to its full length: the limit is read from its config.
* transformers 5 returns model outputs (not tensors) from `get_image_features` /
  `get_text_features`; a thin adapter hands torchmetrics the projected embeddings it expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i_recap.model_files import require_model_dir

CLIP_EXTRA_FILES = ("preprocessor_config.json",)


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _FeaturesAsTensors(torch.nn.Module):
    """A CLIPModel whose `get_*_features` return the projected embeddings as tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return _tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _TruncatingProcessor:
    """Calls the CLIP processor with tokenizer-side truncation at the model's position limit."""

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


def _has_processor_files(path: Path) -> bool:
    return any((path / n).is_file() for n in ("preprocessor_config.json", "processor_config.json"))


def load_clip(path: str | Path, device: str | None = None):
    """(adapter model, raw processor, max text positions) from a local `save_pretrained` folder."""
    from transformers import CLIPModel, CLIPProcessor

    path = require_model_dir(path, "--clip", "CLIP score")
    if not _has_processor_files(path):
        raise FileNotFoundError(f"CLIP score (--clip): {path / 'preprocessor_config.json'} does not exist")
    model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return _FeaturesAsTensors(model).to(device), processor, int(model.config.text_config.max_position_embeddings)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class ClipScorer:
    """Per-image CLIP scores (100 * cosine, as torchmetrics) plus the truncation count."""

    def __init__(self, path: str | Path, device: str | None = None):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.path = Path(path)
        self.model, self.processor, self.max_length = load_clip(path, device)
        # The callable route: torchmetrics never resolves a name, so nothing is downloaded.
        self.metric = CLIPScore(model_name_or_path=lambda: (
            self.model, _TruncatingProcessor(self.processor, self.max_length)))

    def token_lengths(self, texts: list[str]) -> list[int]:
        ids = self.processor.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    @torch.no_grad()
    def score(self, images: list[Image.Image], texts: list[str], batch_size: int = 64) -> list[float]:
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        out: list[float] = []
        for start in range(0, len(images), batch_size):
            imgs = [to_uint8_tensor(im) for im in images[start:start + batch_size]]
            txts = texts[start:start + batch_size]
            # The update CLIPScore.update runs, keeping the per-image scores it would only sum.
            scores, _ = _clip_score_update(imgs, txts, self.metric.model, self.metric.processor)
            # Per image, Hessel et al.'s max(100 * cos, 0); torchmetrics clamps only the mean. The
            # two agree whenever cosines are positive, as they are for any trained CLIP.
            out.extend(max(0.0, s) for s in scores.detach().cpu().tolist())
        return out

    def summary(self, texts: list[str]) -> dict:
        """How many prompts were cut to fit the model's text positions."""
        lengths = self.token_lengths(texts)
        truncated = sum(n > self.max_length for n in lengths)
        return {"max_text_positions": self.max_length,
                "truncated_prompts": truncated, "num_prompts": len(texts),
                "max_prompt_tokens": max(lengths) if lengths else 0}

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Projected CLIP image embeddings (N, D), for the CLIP-feature distances."""
        feats = []
        device = next(self.model.parameters()).device
        for start in range(0, len(images), batch_size):
            px = self.processor(images=[to_uint8_tensor(i) for i in images[start:start + batch_size]],
                                return_tensors="pt")["pixel_values"].to(device)
            feats.append(self.model.get_image_features(px).float().cpu())
        return torch.cat(feats) if feats else torch.empty(0)
