"""The trainer's join of a shard with its recaption sidecar, verified.

A sidecar written by `caption run` records the shard it was made from (content digest, size,
mtime, sample count). Before a shard's samples are joined, that record is checked against the
shard on disk: a sidecar of another download, or of an older version of the shard, is refused
with an error naming both files. While the samples stream, the join counts how many find their
row; once more are missing than `data.min_recaption_coverage` allows, training stops, instead of
training a "p = 0" run on alt-texts. Sidecars made by other tools (no provenance) are joined by
key and guarded by that count alone. Shards and sidecars may be local files or object URLs
(`t2i_recap.storage`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from t2i_recap import storage
from t2i_recap.identity import same_content, shard_digest, stamp
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)
# Sidecar statuses of a usable recaption: the captioner writes "ok"; "success" is img2dataset's word.
CAPTIONED = ("ok", "success")
_warned: set[str] = set()
_EPS = 1e-9  # 8 of 10 meets a coverage of 0.8, though 1 - 0.8 < 0.2 in floating point


class SidecarMismatchError(ValueError):
    """A recaption sidecar was not made from the shard it is joined with."""


class RecaptionCoverageError(RuntimeError):
    """Too few samples of a shard found their row in its recaption sidecar."""


@dataclasses.dataclass
class SidecarJoin:
    """Rows of one sidecar by key, and the running count of samples that found theirs."""

    sidecar: Path | str
    shard: Path | str
    rows: dict[str, dict]
    min_coverage: float
    samples: int = 0
    found: int = 0

    def row(self, key: str) -> dict | None:
        """The sidecar row of sample `key` (None if it has none); stops early once coverage cannot be met."""
        self.samples += 1
        row = self.rows.get(key)
        if row is not None:
            self.found += 1
        elif self._cannot_be_met():
            raise self._error()
        return row

    def _cannot_be_met(self) -> bool:
        """True once the shard's final coverage is sure to fall short, however many samples follow.

        At most len(rows) more samples can find a row, so the shard ends with at most
        len(rows) + missing samples; it fails for sure once missing > (1 - c) / c * len(rows).
        """
        c = self.min_coverage
        return c > 0 and c * self.missing > (1.0 - c) * len(self.rows) + _EPS

    @property
    def missing(self) -> int:
        return self.samples - self.found

    def finish(self) -> None:
        """Called after the shard's last sample: the shard-level coverage check."""
        if self.samples and self.missing > (1.0 - self.min_coverage) * self.samples + _EPS:
            raise self._error()

    def _error(self) -> RecaptionCoverageError:
        return RecaptionCoverageError(
            f"shard {self.shard}: {self.missing} of {self.samples} samples read so far have no row in recaption "
            f"sidecar {self.sidecar} (data.min_recaption_coverage={self.min_coverage}); they would train on the "
            "other caption. Is data.recaption_dir the sidecar folder of these shards, and did captioning finish?")


def open_join(sidecar: Path | str, shard: Path | str, min_coverage: float) -> SidecarJoin:
    """Read `sidecar`, check it was made from `shard`, and index its rows by key."""
    if not storage.is_file(sidecar):
        raise FileNotFoundError(f"recaption sidecar {sidecar} for shard {shard} does not exist (captioner not run "
                                "or not finished for this shard?)")
    table = storage.read_table(sidecar)
    if "key" not in table.column_names:
        raise ValueError(f"recaption sidecar {sidecar} has no 'key' column (columns: {table.column_names})")
    verify(sidecar, shard, table.num_rows)
    return SidecarJoin(sidecar, shard, index_rows(table.to_pylist()), min_coverage)


def index_rows(rows: list[dict]) -> dict[str, dict]:
    """Rows by key; of duplicate keys the captioned row wins (the captioner captions the first of them)."""
    out: dict[str, dict] = {}
    for row in rows:
        old = out.get(row["key"])
        if old is None or (old.get("status", "ok") not in CAPTIONED and row.get("status", "ok") in CAPTIONED):
            out[row["key"]] = row
    return out


def verify(sidecar: Path | str, shard: Path | str, num_rows: int) -> None:
    """Raise SidecarMismatchError unless `sidecar` records `shard`'s content (or records no shard at all)."""
    from t2i_recap.sidecar_format import read_info

    if storage.is_url(sidecar):
        with storage.open_seekable(sidecar) as fh:
            info = read_info(fh)
    else:
        info = read_info(sidecar)
    recorded = ((info or {}).get("shard") or {}).get("input")
    if not recorded:
        if str(sidecar) not in _warned:
            _warned.add(str(sidecar))
            log.warning("recaption sidecar %s records no source shard; joined with %s by key only (coverage "
                        "is still checked)", sidecar, shard)
        return
    source = (info.get("shard") or {}).get("source")
    if not same_content(shard, recorded):
        now = {"digest": shard_digest(shard), **stamp(shard)}
        raise SidecarMismatchError(
            f"recaption sidecar {sidecar} was made from shard {source} ({recorded.get('samples')} samples, "
            f"digest {recorded.get('digest')}), not from shard {shard} (digest {now['digest']}): a sidecar of "
            "another download or of an older version of this shard. Point data.recaption_dir at this shard's "
            "sidecars, or recaption it.")
    if recorded.get("samples") is not None and recorded["samples"] != num_rows:
        raise SidecarMismatchError(f"recaption sidecar {sidecar} holds {num_rows} rows but records {recorded['samples']} "
                                   f"samples of shard {shard}: the file is damaged; recaption the shard")
