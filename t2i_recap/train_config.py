"""The root training config: one section per component, each dataclass defined in its component's file."""

from __future__ import annotations

import dataclasses

from t2i_recap.cache import FeaturesConfig
from t2i_recap.checkpoint import CheckpointConfig
from t2i_recap.data import DataConfig
from t2i_recap.ema import EMAConfig
from t2i_recap.generation import ValidationConfig
from t2i_recap.mixing import MixingConfig, draw_order
from t2i_recap.models import ModelConfig
from t2i_recap.objectives import ObjectiveConfig
from t2i_recap.text_encoders import TextEncoderConfig
from t2i_recap.trainer import OptimConfig, TrainerConfig


@dataclasses.dataclass
class TrainConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Input shards or HF dataset, caption fields, resolution, shuffling."""
    mixing: MixingConfig = dataclasses.field(default_factory=MixingConfig)
    """The paper's p (share of original captions) and CFG dropout."""
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    """Frozen CLIP or T5 text encoder."""
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    """VAE and the feature cache."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """DiT size and runtime switches."""
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    """Rectified flow or DDPM."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """AdamW and learning-rate schedule."""
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    """Weight EMA."""
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    """Loop: steps, batch sizes, precision, seed, run folder."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoint cadence and rotation."""
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    """Validation image grids."""

    def __post_init__(self) -> None:
        if self.mixing.weights is not None:  # every weighted name must be a caption the data defines
            draw_order(self.mixing.weights, list(self.data.caption_specs()))
