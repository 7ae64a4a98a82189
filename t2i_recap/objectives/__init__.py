"""Diffusion objectives, one file each: each has loss() and sample() and names its export scheduler."""

from __future__ import annotations

import dataclasses
from typing import Literal

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")


@dataclasses.dataclass
class ObjectiveConfig:
    name: Literal["rectified_flow", "ddpm"] = "rectified_flow"
    """rectified_flow (logit-normal t, SD3/Sana style; the default) or ddpm (epsilon prediction, the paper's DiT)."""
    weighting_scheme: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    """Rectified flow: timestep density, drawn by diffusers.training_utils.compute_density_for_timestep_sampling
    (Esser et al. 2024, SD3, section 3.1): logit_normal, mode (heavy tails, see mode_scale) or uniform."""
    logit_mean: float = 0.0
    """Rectified flow: mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Rectified flow: std of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """Rectified flow, weighting_scheme=mode: the scale s of SD3's mode sampling (SD3 eq. 20; 1.29 as SD3's
    training scripts in diffusers). Must lie in [0, 2/(pi-2)] ~ [0, 1.75] for the map to stay monotone."""
    shift: float = 1.0
    """Rectified flow: timestep shift t' = shift*t / (1 + (shift-1)*t) (SD3 section 5.3.2; 1 = none, SD3 uses 3.0
    at 1024 px). Above 1 spends more steps at high noise, as larger images need. Training and the exported
    scheduler (its flow_shift) use the same value."""
    snr_gamma: float | None = None
    """DDPM: min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 recommended there): each sample's loss is
    weighted by min(SNR(t), gamma) / SNR(t), SNR from diffusers.training_utils.compute_snr. None = unweighted."""
    num_train_timesteps: int = 1000
    """DDPM: number of diffusion steps (linear betas, as DiT)."""
    beta_start: float = 0.0001
    """DDPM: first beta."""
    beta_end: float = 0.02
    """DDPM: last beta."""

    def __post_init__(self) -> None:
        if self.name not in ("rectified_flow", "ddpm"):
            raise ValueError(f"objective.name must be 'rectified_flow' or 'ddpm', got {self.name!r}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"objective.weighting_scheme must be one of {WEIGHTING_SCHEMES}, "
                             f"got {self.weighting_scheme!r}")
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std must be positive, got {self.logit_std}")
        if not 0 <= self.mode_scale <= 1.75:
            raise ValueError(f"objective.mode_scale must lie in [0, 1.75] (monotone mode sampling), got {self.mode_scale}")
        if not self.shift > 0:
            raise ValueError(f"objective.shift must be > 0, got {self.shift}")
        if self.name == "ddpm" and self.shift != 1.0:
            raise ValueError("objective.shift applies to rectified_flow only; remove it for ddpm")
        if self.snr_gamma is not None:
            if self.name != "ddpm":
                raise ValueError("objective.snr_gamma applies to ddpm only (rectified flow weights timesteps through "
                                 "objective.weighting_scheme)")
            if not self.snr_gamma > 0:
                raise ValueError(f"objective.snr_gamma must be > 0 (or null for no weighting), got {self.snr_gamma}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"objective.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < objective.beta_start < objective.beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}")


def build_objective(cfg: ObjectiveConfig):
    if cfg.name == "rectified_flow":
        from t2i_recap.objectives.rectified_flow import RectifiedFlow

        return RectifiedFlow(cfg)
    from t2i_recap.objectives.ddpm import DDPMEpsilon

    return DDPMEpsilon(cfg)
