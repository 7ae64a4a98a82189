"""Diffusion objectives, one file each: each has loss() and sample() and names its export scheduler."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class ObjectiveConfig:
    name: Literal["rectified_flow", "ddpm"] = "rectified_flow"
    """rectified_flow (logit-normal t, SD3/Sana style; the default) or ddpm (epsilon prediction, the paper's DiT)."""
    logit_mean: float = 0.0
    """Rectified flow: mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Rectified flow: std of the logit-normal timestep density."""
    num_train_timesteps: int = 1000
    """DDPM: number of diffusion steps (linear betas, as DiT)."""
    beta_start: float = 0.0001
    """DDPM: first beta."""
    beta_end: float = 0.02
    """DDPM: last beta."""

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


def build_objective(cfg: ObjectiveConfig):
    if cfg.name == "rectified_flow":
        from t2i_recap.objectives.rectified_flow import RectifiedFlow

        return RectifiedFlow(cfg)
    from t2i_recap.objectives.ddpm import DDPMEpsilon

    return DDPMEpsilon(cfg)
