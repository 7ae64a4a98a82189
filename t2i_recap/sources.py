"""Several shard sets in one run (data.sources), mixed per sample by weight, exactly resumable.

Each source is a set of webdataset shards with its own sidecars and caption specs (everything not
set is taken from the data section) and a sampling weight. Every source keeps its own
deterministic stream (`t2i_recap.data.rank_records`: shards shuffled per epoch, split over ranks,
shuffle buffer); the mixed stream draws, for each position d, a source with probability
weight / sum of weights from a generator seeded by (seed, rank, d), and takes that source's next
record. A source that runs out starts its next epoch on its own, so a small source with a large
weight repeats more often (weights are shares of the samples trained, not of the data).

The cursor of a mixed stream is (d, epoch_1, offset_1, epoch_2, offset_2, ...): the number of
draws made and each source's own cursor. Restarting at a saved cursor gives exactly the records an
uninterrupted run would have seen. Every source must define the same caption names (the mixer
and the feature cache hold one set of text features per sample).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator

from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)


@dataclasses.dataclass
class SourceConfig:
    name: str
    """Short name: prefixes the shard ids of this source (feature cache files, messages)."""
    shards: str
    """Its img2dataset webdataset shards: a folder, glob or brace pattern."""
    weight: float = 1.0
    """Sampling weight: the share of samples drawn from this source is weight / sum of weights."""
    recaption_dir: str | None = None
    """Its recaption sidecars (null = data.recaption_dir)."""
    original_caption: str | None = None
    """Its original caption spec (null = data.original_caption)."""
    recaption: str | None = None
    """Its recaption spec (null = data.recaption)."""
    captions: dict[str, str | None] | None = None
    """Its named captions (null = data.captions); the names must be the same in every source."""
    released_captions: str | None = None
    """Its released-caption parquet (null = data.released_captions)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"data.sources: name {self.name!r} must be letters, digits, - or _")
        if not (self.weight > 0 and self.weight != float("inf")):
            raise ValueError(f"data.sources.{self.name}: weight must be a finite number > 0, got {self.weight}")


def source_configs(data) -> list:
    """One DataConfig per source: the data section with that source's shards and captions."""
    out = []
    for src in data.sources:
        inherit = {f: getattr(src, f) for f in ("recaption_dir", "original_caption", "recaption", "captions",
                                                  "released_captions") if getattr(src, f) is not None}
        out.append(dataclasses.replace(data, shards=src.shards, sources=None, **inherit))
    return out


def check_sources(data) -> None:
    names = [s.name for s in data.sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names must be unique, got {names}")
    if data.shards or data.hf_dataset:
        raise ValueError("set data.sources or data.shards / data.hf_dataset, not both")
    top = list(data.caption_specs())
    captions = [list(cfg.caption_specs()) for cfg in source_configs(data)]
    if any(c != top for c in captions):
        raise ValueError(f"data.sources: every source must define the caption names of the data section {top} (in "
                         "that order); got " + "; ".join(f"{n}: {c}" for n, c in zip(names, captions)))


class MixedSource:
    """Sources of `t2i_recap.data` behind one shard list (for the feature cache), mixed per sample."""

    def __init__(self, subs: list, names: list[str], weights: list[float], *, record, stream,
                 caption_names=None) -> None:
        """`record`: t2i_recap.data.Record; `stream`: t2i_recap.data.rank_records (passed in: data imports this file)."""
        self.subs, self.names, self.weights = subs, names, weights
        self.record, self.stream = record, stream
        self.caption_names = caption_names or subs[0].caption_names
        self.where = [(j, i) for j, sub in enumerate(subs) for i in range(len(sub.shards))]
        self.shards = [self._id(j, subs[j].shards[i]) for j, i in self.where]
        total = sum(weights)
        self._cum = [sum(weights[:k + 1]) / total for k in range(len(weights))]

    def _id(self, j: int, shard: str) -> str:
        """This mixture's id of shard `shard` of source j (a cached source's ids already carry the prefix)."""
        prefix = f"{self.names[j]}."
        return shard if shard.startswith(prefix) else prefix + shard

    @classmethod
    def build(cls, data, make, *, record, stream) -> "MixedSource":
        """The mixture of `data.sources`, each source made by `make(its DataConfig)`."""
        check_sources(data)
        return cls([make(cfg) for cfg in source_configs(data)], [s.name for s in data.sources],
                   [s.weight for s in data.sources], record=record, stream=stream)

    def remix(self, make) -> "MixedSource":
        """The same mixture over other per-source sources, `make(this mixture's shard ids of source j)`
        (e.g. their feature cache files)."""
        subs = [make([self.shards[k] for k, (jj, _) in enumerate(self.where) if jj == j]) for j in range(len(self.subs))]
        return MixedSource(subs, self.names, self.weights, record=self.record, stream=self.stream,
                           caption_names=self.caption_names)

    # shard-indexed access, as `t2i_recap.cache.prepare_cache` reads a source
    def records(self, index: int):
        j, i = self.where[index]
        for rec in self.subs[j].records(i):
            yield self.record(self.shards[index], rec.key, (j, rec))

    def shard_stat(self, index: int) -> dict:
        j, i = self.where[index]
        return {**self.subs[j].shard_stat(i), "source": self.names[j]}

    def shard_content(self, index: int) -> dict:
        j, i = self.where[index]
        return {**self.subs[j].shard_content(i), "source": self.names[j]}

    def decode(self, rec, size: tuple[int, int] | None = None):
        j, inner = rec.payload
        return self.subs[j].decode(inner) if size is None else self.subs[j].decode(inner, size)

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """The aspect-bucket table (data.aspect_buckets), the same in every source."""
        return getattr(self.subs[0], "buckets", None)

    @buckets.setter
    def buckets(self, table) -> None:
        for sub in self.subs:
            sub.buckets = table

    def bucket_of(self, rec) -> int | None:
        j, inner = rec.payload
        return self.subs[j].bucket_of(inner)

    def is_dropped(self, rec) -> bool:
        j, inner = rec.payload
        dropped = getattr(self.subs[j], "is_dropped", None)
        return bool(dropped and dropped(inner))

    def pick(self, seed: int, rank: int, draw: int) -> int:
        """The source of mixed position `draw`: a function of (seed, rank, draw) alone."""
        u = random.Random(f"mix-{seed}-{rank}-{draw}").random()
        return next((k for k, c in enumerate(self._cum) if u < c), len(self._cum) - 1)

    def mixed_records(self, *, seed: int, rank: int, world: int, buffer: int,
                      start: tuple = (0, 0)) -> Iterator[tuple[tuple, object]]:
        """The rank's mixed record stream from cursor `start`; yields (cursor after, record)."""
        n = len(self.subs)
        if len(start) == 2:  # a plain (epoch, offset): restart every source at that epoch (another world size)
            start = (0, *[v for _ in range(n) for v in (start[0], 0)])
        if len(start) != 1 + 2 * n:
            raise ValueError(f"data cursor {list(start)} is not one of {n} sources (was data.sources changed?)")
        draw, cursors = start[0], [tuple(start[1 + 2 * j:3 + 2 * j]) for j in range(n)]
        streams = [self.stream(sub, seed=seed, rank=rank, world=world, buffer=buffer, start=cursors[j])
                   for j, sub in enumerate(self.subs)]
        while True:
            j = self.pick(seed, rank, draw)
            cursors[j], rec = next(streams[j])
            draw += 1
            yield (draw, *[v for c in cursors for v in c]), self.record(self._id(j, rec.shard), rec.key, (j, rec))
