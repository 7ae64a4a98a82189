"""The root config of `t2i-recap clip train`: the DiT trainer's data, mixing, optimizer and
checkpoint sections, plus the CLIP model and loop sections defined here."""

from __future__ import annotations

import dataclasses
from typing import Literal

from t2i_recap.checkpoint import CheckpointConfig
from t2i_recap.data import DataConfig
from t2i_recap.mixing import MixingConfig
from t2i_recap.trainer import OptimConfig

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass
class ClipModelConfig:
    """Size of a randomly initialised transformers.CLIPModel."""

    tokenizer: str = ""
    """Tokenizer folder (any CLIP-style tokenizer with bos/eos/pad), saved into the export."""
    text_max_length: int = 128
    """Text tokens per caption, the rest truncated (Li et al. 2024 train Recap-CLIP with 128)."""
    image_size: int = 224
    """Image side the vision tower sees (the image processor resizes + centre-crops to it)."""
    patch_size: int = 16
    """Vision patch side in pixels."""
    hidden_size: int = 768
    """Vision tower width."""
    text_hidden_size: int = 512
    """Text tower width."""
    num_layers: int = 12
    """Transformer layers per tower."""
    num_heads: int = 12
    """Vision attention heads."""
    text_num_heads: int = 8
    """Text attention heads."""
    mlp_ratio: int = 4
    """MLP width as a multiple of each tower's width."""
    projection_dim: int = 512
    """Size of the shared image-text embedding."""
    image_mean: list[float] = dataclasses.field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    """Per-channel mean written into the image processor."""
    image_std: list[float] = dataclasses.field(default_factory=lambda: list(OPENAI_CLIP_STD))
    """Per-channel std written into the image processor."""

    def __post_init__(self) -> None:
        for name in ("text_max_length", "image_size", "patch_size", "hidden_size", "text_hidden_size",
                     "num_layers", "num_heads", "text_num_heads", "mlp_ratio", "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.text_hidden_size % self.text_num_heads:
            raise ValueError("hidden_size / text_hidden_size must be divisible by num_heads / text_num_heads")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each, std > 0")


@dataclasses.dataclass
class ClipLoopConfig:
    """The CLIP training loop."""

    run_dir: str = "runs/clip"
    """Run folder: resolved config, checkpoints, summary, export/ (the CLIPModel + processor)."""
    max_steps: int = 10_000
    """Optimizer steps."""
    batch_size: int = 256
    """Pairs per process per step; the contrastive negatives are the other pairs of the process's batch."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning rate after the linear warm-up (optim.warmup_steps): cosine decay to 0 (CLIPA) or constant."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision (weights and optimizer stay fp32)."""
    seed: int = 0
    """Base seed of the data order and the caption mix."""
    log_every: int = 10
    """Log the loss every N steps."""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 2 or self.log_every < 1:
            raise ValueError("max_steps and log_every must be >= 1, batch_size >= 2 (a contrastive batch)")


@dataclasses.dataclass
class ClipTrainConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Input shards (+ recaption sidecars), caption specs, resolution of the decoded images."""
    mixing: MixingConfig = dataclasses.field(default_factory=lambda: MixingConfig(cfg_dropout=0.0))
    """The paper's p: share of original captions per sample per step (cfg_dropout must stay 0)."""
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    """CLIP size, text length, image processor statistics."""
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.2))
    """AdamW and warm-up."""
    trainer: ClipLoopConfig = dataclasses.field(default_factory=ClipLoopConfig)
    """Steps, batch, schedule, seed, run folder."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoint cadence and rotation."""

    def __post_init__(self) -> None:
        if self.mixing.cfg_dropout != 0.0:
            raise ValueError(f"mixing.cfg_dropout={self.mixing.cfg_dropout}: CLIP training has no empty caption; set 0")
        if getattr(self.optim, "schedule", "constant") != "constant" or getattr(self.optim, "schedule_steps", None):
            raise ValueError("optim.schedule / optim.schedule_steps are not read by CLIP training; set trainer.schedule")
