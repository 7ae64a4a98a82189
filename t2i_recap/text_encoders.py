"""Frozen text encoders (CLIP text tower as the paper, or a T5 encoder as PixArt), by hub id or path.

Encoding matches what PixArtAlphaPipeline does at inference (pad to max_length, pass the attention
mask, take the last hidden state), so a trained model sees the same features in the exported pipeline.
Truncation is measured, not hidden: recaptions average ~49 words (docs/references.md section 1), and
CLIP's 77 tokens cut many of them; the trainer logs the truncated share.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel

from t2i_recap.identity import model_digest
from t2i_recap.io import check_model_source
from t2i_recap.logging_utils import get_logger
from t2i_recap.long_text import encode_chunks

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CLIP_TYPES = ("clip", "clip_text_model")
_T5_TYPES = ("t5", "mt5", "umt5")


@dataclasses.dataclass
class TextEncoderConfig:
    name_or_path: str = "openai/clip-vit-large-patch14"
    """Hub id or local folder of a CLIP (text tower used) or T5 checkpoint."""
    subfolder: str = ""
    """Subfolder of the model inside name_or_path (e.g. "text_encoder" in a pipeline repo)."""
    tokenizer_subfolder: str = ""
    """Subfolder of the tokenizer inside name_or_path (e.g. "tokenizer")."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    max_length: int | None = None
    """Tokens per caption (per chunk with long_captions=chunks); None = 77 for CLIP (its position table),
    120 for T5 (PixArt-alpha)."""
    dtype: str = "float32"
    """dtype of the frozen encoder: float32, bfloat16 or float16."""
    long_captions: Literal["truncate", "chunks"] = "truncate"
    """CLIP only: `truncate` cuts captions at max_length tokens; `chunks` encodes up to `max_chunks` chunks
    of max_length - 2 tokens each, as kohya-ss/sd-scripts and OneTrainer do (t2i_recap/long_text.py).
    Captions cut either way are counted. T5 has relative positions: raise max_length instead."""
    max_chunks: int = 3
    """Chunks per caption with long_captions=chunks: 3 x 75 = 225 caption tokens for CLIP."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.long_captions not in ("truncate", "chunks"):
            raise ValueError(f"long_captions must be truncate or chunks, got {self.long_captions!r}")
        if self.max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {self.max_chunks}")


def _local_digest(path: Path) -> str:
    """Content identity of a local model folder (`t2i_recap.identity.model_digest`: every byte, not names and sizes)."""
    return model_digest(path)


def model_identity(name_or_path: str, subfolder: str = "", revision: str | None = None) -> dict:
    """What a cache fingerprint records about a model: id, revision, and a digest when it is local."""
    path = Path(name_or_path) / subfolder
    out = {"id": name_or_path, "subfolder": subfolder, "revision": revision}
    if path.is_dir():
        out["digest"] = _local_digest(path)
    return out


class TextEncoder:
    """Tokenizer + frozen encoder; `encode(texts)` -> (embeddings, mask, truncated flags)."""

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        kw = {"revision": cfg.revision} if cfg.revision else {}
        sub = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        check_model_source(cfg.name_or_path, "text_encoder.name_or_path")
        model_type = AutoConfig.from_pretrained(cfg.name_or_path, **sub, **kw).model_type
        if model_type in _CLIP_TYPES:
            cls, default_len = CLIPTextModel, 77
        elif model_type in _T5_TYPES:
            cls, default_len = T5EncoderModel, 120
        else:
            raise ValueError(f"text encoder {cfg.name_or_path!r}: model_type {model_type!r} is neither CLIP "
                             f"({', '.join(_CLIP_TYPES)}) nor T5 ({', '.join(_T5_TYPES)})")
        self.model_type = model_type
        self.model = cls.from_pretrained(cfg.name_or_path, dtype=DTYPES[cfg.dtype], **sub, **kw).to(device).eval()
        self.model.requires_grad_(False)
        tsub = {"subfolder": cfg.tokenizer_subfolder} if cfg.tokenizer_subfolder else {}
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **tsub, **kw)
        self.chunk_length = cfg.max_length or default_len
        if model_type in _CLIP_TYPES and self.chunk_length > self.model.config.max_position_embeddings:
            raise ValueError(f"text_encoder.max_length={self.chunk_length} exceeds CLIP's "
                             f"{self.model.config.max_position_embeddings} positions")
        self.chunks = cfg.max_chunks if cfg.long_captions == "chunks" else None
        if self.chunks and model_type not in _CLIP_TYPES:
            raise ValueError(f"text_encoder.long_captions=chunks is for CLIP; {cfg.name_or_path!r} is {model_type}, "
                             "whose relative positions take longer captions through text_encoder.max_length")
        self.max_length = self.chunk_length * (self.chunks or 1)
        """Rows of the encoded caption: what the DiT's cross-attention sees."""

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def identity(self) -> dict:
        out = {**model_identity(self.cfg.name_or_path, self.cfg.subfolder, self.cfg.revision),
               "max_length": self.max_length, "dtype": self.cfg.dtype, "model_type": self.model_type}
        if self.chunks:  # only then: caches built before the option existed keep their fingerprint
            out.update(chunks=self.chunks, chunk_length=self.chunk_length)
        return out

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) float embeddings, (B, L) int64 mask, (B,) bool: was the caption cut (at L tokens,
        or with chunks at max_chunks x (max_length - 2) caption tokens)."""
        if self.chunks:
            emb, mask, truncated = encode_chunks(self.tokenizer, self.model, texts, self.chunks, self.chunk_length)
            return emb.float(), mask.long(), truncated
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        emb = self.model(ids, attention_mask=mask)[0]
        truncated = torch.tensor([n > self.max_length for n in self.token_counts(texts)], dtype=torch.bool)
        return emb.float(), mask.long(), truncated


def identity_json(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)
