"""Caption mixing (the paper's ratio p) and classifier-free-guidance dropout, applied per sample per step.

Li et al. 2024 section 5: each training sample uses its ORIGINAL web caption with probability p,
else its recaption. A sample lacking the drawn caption falls back to the other one, and the
fallback is counted (a run at p=0 whose recaptions are half missing is not a p=0 run). CFG dropout
then swaps in the empty caption's embedding, drawn anew every step: dropping at cache time would drop
the same captions every epoch (a diffusers example bug, docs/references.md section 4).

Named captions (data.captions) generalise p: `weights` maps caption names to sampling weights, and
each sample draws one name per step with probability weight / sum of weights. `p` is the shorthand
for {original: p, recaption: 1 - p} and draws exactly what it always drew: one uniform number u
per sample picks the name whose interval of the cumulative weights holds u, so u < p is ORIGINAL.
A sample lacking the drawn caption falls back among the captions it has, by weight (uniformly when
all it has weigh 0), using u's place inside the drawn interval as a fresh uniform number: no extra
draw, so the random stream never depends on which captions are missing. Fallbacks are counted.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

ORIGINAL, RECAPTION, EMPTY = 0, 1, 2
NAMED_EMPTY = -1  # the empty caption in a NamedChoice


@dataclasses.dataclass
class MixingConfig:
    p: float = 0.0
    """Probability of the ORIGINAL caption per sample per step (the paper's p; 0 = recaptions only)."""
    cfg_dropout: float = 0.1
    """Probability of replacing the caption by the empty caption (classifier-free guidance training)."""
    weights: dict[str, float] | None = None
    """Sampling weight per named caption (data.captions), drawn per sample per step; None = p's
    {original: p, recaption: 1 - p}. Weights need not sum to 1. Set either this or p."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.weights is not None:
            if self.p != 0.0:
                raise ValueError(f"mixing.p={self.p} and mixing.weights are both set; p is the shorthand for "
                                 "weights {original: p, recaption: 1 - p}: set one of them")
            bad = {k: w for k, w in self.weights.items() if not (w >= 0.0 and w != float("inf"))}
            if bad or not self.weights or sum(self.weights.values()) <= 0:
                raise ValueError(f"mixing.weights must be finite numbers >= 0 with a positive sum, got {self.weights}")

    def resolved_weights(self) -> dict[str, float]:
        """Caption name -> weight, in draw order."""
        if self.weights is None:
            return {"original": self.p, "recaption": 1.0 - self.p}
        return dict(self.weights)


@dataclasses.dataclass
class MixCounts:
    """Running counts of what the mixer chose, for logs and the run summary."""

    original: int = 0
    recaption: int = 0
    empty: int = 0
    fallback_to_original: int = 0
    fallback_to_recaption: int = 0
    chosen: dict[str, int] = dataclasses.field(default_factory=dict)
    """Samples that used each named caption (the empty caption not included)."""
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    """"DRAWN->USED": samples whose drawn caption was missing, by what they used instead."""
    flagged_recaptions: int = 0
    """Samples trained whose recaption the captioner flagged (data.flagged_recaptions keep or fallback)."""
    dropped_flagged: int = 0
    """Samples not trained because their recaption was flagged (data.flagged_recaptions=drop)."""
    buckets: dict[str, int] = dataclasses.field(default_factory=dict)
    """data.aspect_buckets: samples trained per bucket ("HxW" in pixels)."""
    bucket_remainder: int = 0
    """data.aspect_buckets: samples left out at an epoch's end in buckets that did not fill a micro-batch."""

    def __post_init__(self) -> None:
        if not self.chosen and (self.original or self.recaption):  # counts saved before named captions
            self.chosen = {"original": self.original, "recaption": self.recaption}

    def add(self, other: "MixCounts") -> None:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            else:
                setattr(self, f.name, mine + theirs)

    def total(self) -> int:
        return sum(self.chosen.values()) + self.empty

    def fallback_total(self) -> int:
        return sum(self.fallbacks.values())


class NamedChoice(NamedTuple):
    """Per sample: the index into `names` of the caption it uses, or NAMED_EMPTY."""

    names: tuple[str, ...]
    index: torch.Tensor


def draw_order(weights: dict[str, float], names) -> list[str]:
    """The weighted names first (their config order), then the rest (weight 0: fallbacks only)."""
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise ValueError(f"mixing.weights names captions that data.captions does not define: {unknown} "
                         f"(captions: {list(names)})")
    return list(weights) + [n for n in names if n not in weights]


def choose_named(has: dict[str, torch.Tensor], weights: dict[str, float], cfg_dropout: float,
                 generator: torch.Generator) -> tuple[NamedChoice, MixCounts]:
    """Per sample, one named caption drawn by weight (or EMPTY by cfg_dropout); two draws per sample, always."""
    names = draw_order(weights, list(has))
    present = torch.stack([has[n].bool().cpu() for n in names], dim=1)  # (n, N)
    if (~present.any(dim=1)).any():
        raise ValueError("a sample has none of the captions " + ", ".join(names) + "; the data reader must skip it")
    n = present.shape[0]
    w = torch.tensor([float(weights.get(name, 0.0)) for name in names], dtype=torch.float64)
    cum = torch.cumsum(w, 0) / w.sum()
    u = torch.rand(n, generator=generator)
    drop = torch.rand(n, generator=generator) < cfg_dropout
    # the number of interval ends <= u (searchsorted right=True, which is slower on a few names)
    drawn = (u.unsqueeze(1) >= cum.to(torch.float32).unsqueeze(0)).sum(dim=1).clamp(max=int((w > 0).nonzero().max()))
    missing = ~present[torch.arange(n), drawn]
    index = drawn.clone()
    if missing.any():
        lo = torch.cat([torch.zeros(1, dtype=torch.float64), cum])[drawn]
        inner = ((u.double() - lo) / (cum[drawn] - lo)).clamp(0.0, 1.0)  # uniform inside the drawn interval
        index[missing] = _by_weight(present[missing], w, inner[missing])
    index = torch.where(drop, torch.full_like(index, NAMED_EMPTY), index)
    counts = MixCounts(empty=int(drop.sum()))
    used = index[~drop]
    for i, name in enumerate(names):
        counts.chosen[name] = int((used == i).sum())
    fell = missing & ~drop
    if fell.any():
        pairs = torch.bincount(drawn[fell] * len(names) + index[fell], minlength=len(names) ** 2).tolist()
        counts.fallbacks = {f"{names[k // len(names)]}->{names[k % len(names)]}": v for k, v in enumerate(pairs) if v}
    counts.original, counts.recaption = counts.chosen.get("original", 0), counts.chosen.get("recaption", 0)
    counts.fallback_to_original = sum(v for k, v in counts.fallbacks.items() if k.endswith("->original"))
    counts.fallback_to_recaption = sum(v for k, v in counts.fallbacks.items() if k.endswith("->recaption"))
    return NamedChoice(tuple(names), index), counts


def _by_weight(present: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, a present name drawn by weight with uniform `u` (uniformly when every present one weighs 0)."""
    weighted = present.double() * w
    zero = weighted.sum(dim=1) == 0
    weighted[zero] = present[zero].double()
    cum = torch.cumsum(weighted, dim=1) / weighted.sum(dim=1, keepdim=True)
    pick = (cum <= u.unsqueeze(1)).sum(dim=1)
    last = (weighted > 0).double().cumsum(dim=1).argmax(dim=1)  # the last name that can be picked
    return torch.minimum(pick, last)


def select_named(choice: NamedChoice, candidates: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 empty: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's (embedding (B, L, D), mask (B, L)) from its chosen caption; `empty` is (1, L, D)."""
    first = candidates[choice.names[0]][0]
    index = choice.index.to(first.device)
    emb = torch.stack([candidates[n][0] for n in choice.names], dim=1)
    mask = torch.stack([candidates[n][1] for n in choice.names], dim=1)
    rows = torch.arange(index.shape[0], device=first.device)
    emb, mask = emb[rows, index.clamp(min=0)], mask[rows, index.clamp(min=0)]
    is_empty = index == NAMED_EMPTY
    emb = torch.where(is_empty.view(-1, 1, 1), empty[0].to(emb.dtype).expand_as(emb), emb)
    mask = torch.where(is_empty.view(-1, 1), empty[1].to(mask.dtype).expand_as(mask), mask)
    return emb, mask


def choose(has_original: torch.Tensor, has_recaption: torch.Tensor, cfg: MixingConfig,
           generator: torch.Generator) -> tuple[torch.Tensor, MixCounts]:
    """Per sample: ORIGINAL, RECAPTION or EMPTY. Two draws per sample, always, so the random stream
    (and a resumed run) does not depend on which captions happen to be missing."""
    weights = cfg.resolved_weights()
    if set(weights) - {"original", "recaption"}:
        raise ValueError(f"mixing.weights names captions {sorted(set(weights) - {'original', 'recaption'})}; this "
                         "trainer mixes the original caption and the recaption only (named captions: t2i-recap train)")
    has_original, has_recaption = has_original.bool().cpu(), has_recaption.bool().cpu()
    if (~has_original & ~has_recaption).any():
        raise ValueError("a sample has neither an original caption nor a recaption; the data reader must skip it")
    named, counts = choose_named({"original": has_original, "recaption": has_recaption}, weights,
                                 cfg.cfg_dropout, generator)
    code = {i: {"original": ORIGINAL, "recaption": RECAPTION}[n] for i, n in enumerate(named.names)}
    choice = torch.full_like(named.index, EMPTY)
    for i, c in code.items():
        choice[named.index == i] = c
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
