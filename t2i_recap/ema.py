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
    """Per-step decay (DiT uses 0.9999; short runs need less, e.g. 0.99)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

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
