"""The configs of `t2i-recap caption finetune`: data, a new captioner's shape, LoRA and training.

One dataclass per part (docstring per field, checks in `__post_init__`); `FinetuneConfig` is the
root that configs/caption/finetune_*.yaml override.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch


@dataclasses.dataclass
class FinetuneDataConfig:
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
    data: FinetuneDataConfig = dataclasses.field(default_factory=FinetuneDataConfig)
    """The (image, caption) pairs: shards, caption field, curated share."""
    build: BuildConfig = dataclasses.field(default_factory=BuildConfig)
    """A new captioner's parts, when `model` is unset."""
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    """The loop: epochs, batch, schedule, which parts train, device."""
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    """LoRA adapters on the decoder instead of full fine-tuning."""
