"""Exponential moving average of the model's weights (fp32 shadow copy), saved beside the model.

Under FSDP2 the shadow is built from the sharded parameters, so each rank keeps the DTensor shard
placed like its parameter and `lerp_` stays local; `state_dict` gathers full tensors and
`load_state_dict` cuts them, so under FSDP every rank calls both.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from t2i_recap.fsdp import gathered, shard_like


@dataclasses.dataclass
class EMAConfig:
    enabled: bool = True
    """Keep an EMA of the weights; validation and export use it when present."""
    decay: float = 0.9999
    """Largest per-step decay (DiT uses 0.9999)."""
    warmup: bool = True
    """Ramp the decay up as diffusers' EMAModel(use_ema_warmup=True) does, so a short run does not
    export weights that barely moved from initialisation: decay_t = min(decay, 1 - (1 + t/inv_gamma)^-power)."""
    inv_gamma: float = 1.0
    """Warm-up time scale in optimizer steps (diffusers' default)."""
    power: float = 2 / 3
    """Warm-up exponent (diffusers: 2/3 for long runs, 3/4 for short ones)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")
        if self.inv_gamma <= 0 or self.power <= 0:
            raise ValueError(f"ema.inv_gamma and ema.power must be > 0, got {self.inv_gamma}, {self.power}")

    def decay_at(self, step: int) -> float:
        """The decay applied by the update that finishes optimizer step `step` (1-based)."""
        if not self.warmup:
            return self.decay
        # diffusers.training_utils.EMAModel.get_decay counts steps from 0 (step - update_after_step - 1).
        value = 1.0 - (1.0 + (step - 1) / self.inv_gamma) ** -self.power
        return max(0.0, min(self.decay, value))


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float | EMAConfig) -> None:
        # A bare float keeps the constant decay of earlier versions (no warm-up).
        self.cfg = decay if isinstance(decay, EMAConfig) else EMAConfig(decay=decay, warmup=False)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @property
    def decay(self) -> float:
        return self.cfg.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None, skip: torch.Tensor | None = None) -> None:
        """Blend in the live weights after optimizer step `step` (1-based).

        The warm-up reads the trainer's step, which the checkpoint already keeps, so a resumed run
        continues the same decay schedule; without `step` the decay is the constant maximum.
        `skip`, a 0/1 device flag, leaves the shadow as it is when 1 (a skipped optimizer step)
        without the host reading it. One `torch._foreach_lerp_` over all tensors: one kernel launch
        per group of tensors instead of one per parameter.
        """
        decay = self.cfg.decay if step is None else self.cfg.decay_at(step)
        shadows, live = self._pairs(model)
        if not shadows:
            return
        if skip is None:
            torch._foreach_lerp_(shadows, live, 1.0 - decay)
        else:  # a tensor weight per tensor: lerp by 0 keeps the shadow exactly
            weight = (1.0 - skip.to(shadows[0].dtype)) * (1.0 - decay)
            torch._foreach_lerp_(shadows, live, [weight] * len(shadows))

    def _pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow, fp32 live weight) pairs in parameter order; a weight already fp32 is not copied."""
        shadows, live = [], []
        for name, p in model.named_parameters():
            if name in self.shadow:
                shadows.append(self.shadow[name])
                live.append(p.detach().float())
        return shadows, live

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (a DTensor shard is gathered to the CPU, one at a time)."""
        return {n: gathered(v) for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(shard_like(shadow, state[name]))

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into `model` (validation), restoring the live weights after."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    params[n].copy_(v)
