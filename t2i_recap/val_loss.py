"""Validation loss on held-out shards, at fixed timesteps and fixed noise, so numbers compare across runs.

The training loss is a noisy estimate (each step draws its own timesteps and noise), and an image grid
is no number. As kohya-ss/sd-scripts#193 and pytorch/torchtitan#1151 ask, the trainer can score the
objective on held-out samples: the same samples, timesteps (`objective.fixed_timesteps`) and noise
(a generator seeded by `validation.loss_seed`) at every evaluation and in every run. The loss is the
plain, unweighted one (no min-SNR weights, no training timestep density), once with each of the
sample's named captions (`original`, `recaption`, and any in `data.captions`).

The held-out samples are `validation.loss_shards`, or by default the last `validation.holdout_shards`
of `data.shards`, which are then kept out of training (and the resume check treats that as a change
of the training data). They are the first `loss_batches x loss_batch_size` usable samples in shard
order; with `data.aspect_buckets` each is scored at its own bin's size, as training sees it, and
they are batched bin by bin (so there may be a few more, smaller batches than `loss_batches`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

from t2i_recap.data import Skip, build_source, collate
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)


class ShardSubset:
    """A data source restricted to some of its shards, with its own shard numbering."""

    def __init__(self, source, indices: list[int]) -> None:
        self._source, self._indices = source, list(indices)
        self.shards = [source.shards[i] for i in self._indices]
        if hasattr(source, "paths"):
            self.paths = [source.paths[i] for i in self._indices]

    def records(self, index: int):
        return self._source.records(self._indices[index])

    def shard_stat(self, index: int) -> dict:
        return self._source.shard_stat(self._indices[index])

    def shard_content(self, index: int) -> dict:
        return self._source.shard_content(self._indices[index])

    def sidecar_file(self, index: int):
        return self._source.sidecar_file(self._indices[index])

    def decode(self, rec, size: tuple[int, int] | None = None):
        return self._source.decode(rec) if size is None else self._source.decode(rec, size)

    def __getattr__(self, name: str):  # cfg, specs, caption names: what does not depend on a shard number
        return getattr(self._source, name)


def split_holdout(source, vcfg, data_cfg):
    """(training source, held-out source or None) for the validation settings `vcfg`."""
    if vcfg.loss_every_steps < 0:
        return source, None
    if vcfg.loss_shards:
        held = build_source(dataclasses.replace(data_cfg, shards=vcfg.loss_shards))
        shared = sorted(set(held.shards) & set(source.shards))
        if shared:
            raise ValueError(f"validation.loss_shards {vcfg.loss_shards!r} shares shards with data.shards "
                             f"({', '.join(shared[:3])}): a validation loss on training samples measures nothing held out")
        held.buckets = getattr(source, "buckets", None)  # the run's bin table (t2i_recap.buckets.enable_buckets)
        return source, held
    n, total = vcfg.holdout_shards, len(source.shards)
    if total <= n:
        raise ValueError(f"validation.loss_every_steps needs held-out data: data.shards has {total} shard(s), so "
                         f"holding out validation.holdout_shards={n} leaves none to train on; set "
                         "validation.loss_shards to other shards")
    log.info("validation loss: holding out the last %d of %d shards (%s) from training", n, total,
             ", ".join(source.shards[total - n:][:3]))
    return ShardSubset(source, list(range(total - n))), ShardSubset(source, list(range(total - n, total)))


def _examples(source) -> Iterator[dict]:
    """The held-out samples in shard order, each decoded at its aspect bin's size when the source has
    a bin table, else at the square training resolution."""
    table = getattr(source, "buckets", None)
    for index in range(len(source.shards)):
        for rec in source.records(index):
            b = source.bucket_of(rec) if table else None
            ex = source.decode(rec) if b is None else source.decode(rec, table[b])
            if isinstance(ex, Skip):
                log.warning("validation loss: skipping sample %s of %s: %s", ex.key, ex.shard, ex.reason)
                continue
            if table and b is None:
                raise RuntimeError(f"validation loss: sample {rec.key} of {rec.shard}: its image header gives no "
                                   "size, yet it decodes")
            yield ex


def _batches(examples: Iterator[dict], count: int, size: int) -> list[list[dict]]:
    """The first `count x size` examples in micro-batches of at most `size`, each of one image size
    (one aspect bin), in the order each size first appears."""
    by_size: dict[tuple, list[dict]] = {}
    for _, ex in zip(range(count * size), examples):
        by_size.setdefault(tuple(ex["pixels"].shape), []).append(ex)
    return [group[i:i + size] for group in by_size.values() for i in range(0, len(group), size)]


class ValidationLoss:
    """The held-out batches' features, computed once; `compute(model_fn)` scores a model on them."""

    def __init__(self, source, encoder, objective, vcfg, caption_names=("original", "recaption")) -> None:
        self.encoder, self.objective, self.cfg = encoder, objective, vcfg
        self.names = tuple(caption_names)
        self.batches: list[dict] = []
        for chunk in _batches(_examples(source), vcfg.loss_batches, vcfg.loss_batch_size):
            feats = encoder.encode_batch(collate(chunk), self.names)
            self.batches.append({k: v.cpu() for k, v in feats.items() if isinstance(v, torch.Tensor)})
        if not self.batches:
            raise ValueError(f"validation loss: the held-out shards ({', '.join(source.shards[:3])}) hold no usable sample")
        self.samples = sum(len(b["mean"]) for b in self.batches)
        self.timesteps = objective.fixed_timesteps(vcfg.loss_timesteps)
        self.history: list[dict] = []
        self.sizes = sorted({tuple(b["mean"].shape[-2:]) for b in self.batches})
        log.info("validation loss: %d held-out samples x %d timesteps, latents at %s", self.samples,
                 len(self.timesteps), ", ".join(f"{h}x{w}" for h, w in self.sizes))

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.loss_every_steps
        return every >= 0 and ((every > 0 and step % every == 0) or last)

    @torch.no_grad()
    def compute(self, model_fn: Callable, device: torch.device) -> dict[str, float]:
        """Mean loss per named caption over the held-out samples (those that have it) and fixed timesteps."""
        sums = {name: 0.0 for name in self.names}
        counts = {name: 0 for name in self.names}
        for b, feats in enumerate(self.batches):
            gen = torch.Generator().manual_seed(self.cfg.loss_seed * 1_000_003 + b)
            x0 = _latents(feats, gen, self.encoder).to(device)
            noises = [torch.randn(x0.shape, generator=gen) for _ in self.timesteps]
            for name in self.names:
                rows = feats[f"has_{name}"].bool()
                if not rows.any():
                    continue
                emb = feats[f"{name}_emb"][rows].to(device).float()
                mask = feats[f"{name}_mask"][rows].to(device).float()
                for t, noise in zip(self.timesteps, noises):
                    tt = t.expand(int(rows.sum())).to(device)
                    loss = self.objective.loss_at(model_fn, x0[rows.to(device)], tt, noise[rows].to(device),
                                                  encoder_hidden_states=emb, encoder_attention_mask=mask)
                    sums[name] += float(loss) * int(rows.sum())
                    counts[name] += int(rows.sum())
        out = {f"val_loss/{name}": sums[name] / counts[name] for name in self.names if counts[name]}
        out["val_loss"] = sum(sums.values()) / max(sum(counts.values()), 1)
        return out


def _latents(feats: dict, gen: torch.Generator, encoder) -> torch.Tensor:
    from t2i_recap.cache import latents_from

    return latents_from({k: feats[k] for k in ("mean", "logvar") if k in feats}, gen, encoder.scaling_factor,
                        encoder.shift_factor)
