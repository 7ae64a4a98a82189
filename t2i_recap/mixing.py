"""Caption mixing (the paper's ratio p) and classifier-free-guidance dropout, applied per sample per step.

Li et al. 2024 section 5: each training sample uses its ORIGINAL web caption with probability p,
else its recaption. A sample lacking the drawn caption falls back to the other one, and the
fallback is counted (a run at p=0 whose recaptions are half missing is not a p=0 run). CFG dropout
then swaps in the empty caption's embedding, drawn anew every step: dropping at cache time would drop
the same captions every epoch (a diffusers example bug, docs/references.md section 4).
"""

from __future__ import annotations

import dataclasses

import torch

ORIGINAL, RECAPTION, EMPTY = 0, 1, 2


@dataclasses.dataclass
class MixingConfig:
    p: float = 0.0
    """Probability of the ORIGINAL caption per sample per step (the paper's p; 0 = recaptions only)."""
    cfg_dropout: float = 0.1
    """Probability of replacing the caption by the empty caption (classifier-free guidance training)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclasses.dataclass
class MixCounts:
    """Running counts of what the mixer chose, for logs and the run summary."""

    original: int = 0
    recaption: int = 0
    empty: int = 0
    fallback_to_original: int = 0
    fallback_to_recaption: int = 0

    def add(self, other: "MixCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def total(self) -> int:
        return self.original + self.recaption + self.empty


def choose(has_original: torch.Tensor, has_recaption: torch.Tensor, cfg: MixingConfig,
           generator: torch.Generator) -> tuple[torch.Tensor, MixCounts]:
    """Per sample: ORIGINAL, RECAPTION or EMPTY. Two draws per sample, always, so the random stream
    (and a resumed run) does not depend on which captions happen to be missing."""
    has_original, has_recaption = has_original.bool().cpu(), has_recaption.bool().cpu()
    if (~has_original & ~has_recaption).any():
        raise ValueError("a sample has neither an original caption nor a recaption; the data reader must skip it")
    n = has_original.shape[0]
    want_original = torch.rand(n, generator=generator) < cfg.p
    drop = torch.rand(n, generator=generator) < cfg.cfg_dropout
    to_recaption = want_original & ~has_original
    to_original = ~want_original & ~has_recaption
    use_original = (want_original & has_original) | to_original
    choice = torch.where(use_original, ORIGINAL, RECAPTION)
    choice = torch.where(drop, EMPTY, choice)
    counts = MixCounts(
        original=int(((choice == ORIGINAL)).sum()),
        recaption=int(((choice == RECAPTION)).sum()),
        empty=int(drop.sum()),
        fallback_to_original=int((to_original & ~drop).sum()),
        fallback_to_recaption=int((to_recaption & ~drop).sum()),
    )
    return choice, counts


def select(choice: torch.Tensor, original: tuple[torch.Tensor, torch.Tensor], recaption: tuple[torch.Tensor, torch.Tensor],
           empty: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each sample's (embedding (B, L, D), mask (B, L)) from the three candidates; `empty` is (1, L, D)."""
    choice = choice.to(original[0].device)
    emb = torch.where((choice == ORIGINAL).view(-1, 1, 1), original[0], recaption[0])
    mask = torch.where((choice == ORIGINAL).view(-1, 1), original[1], recaption[1])
    is_empty = choice == EMPTY
    emb = torch.where(is_empty.view(-1, 1, 1), empty[0].to(emb.dtype).expand_as(emb), emb)
    mask = torch.where(is_empty.view(-1, 1), empty[1].to(mask.dtype).expand_as(mask), mask)
    return emb, mask


def trim_padding(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the token columns that are padding in every sample of the batch; no mask at all when
    nothing is left padded.

    Masked keys get an additive -10000 bias, so their attention weight is exactly zero: the output is
    unchanged, but cross-attention over e.g. 20 of CLIP's 77 (or T5's 300) positions costs less.
    An all-ones mask only adds a zero bias, yet diffusers still builds that bias, which keeps SDPA
    off its flash kernel; passing None instead computes the same attention on the fast kernel.
    Give a CPU mask where you can: reading its extent from a GPU mask waits for the GPU.
    """
    keep = int(mask.sum(dim=1).max().clamp(min=1))
    mask = mask[:, :keep]
    return emb[:, :keep], (None if bool(mask.all()) else mask)
