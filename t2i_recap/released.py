"""The released Recap-DataComp-1B captions as a caption source, joined to the user's own download.

The release is parquet without images (columns `url, re_caption, org_caption, sha256, key,
re_clip_score, org_clip_score, re_length, org_length`, later also
`re_caption_condition_diverse_topk`; docs/references.md section 1). A user who downloaded the
images with img2dataset has, in each sample's `.json`, the `url` and (img2dataset's default
compute_hash="sha256") the `sha256` of the downloaded bytes. `data.released_captions` names the
parquet files (a path, folder or glob), `data.join_on` the column both sides share (sha256: the
same bytes; url: the same address, whatever it serves now), and a caption spec
`released:COLUMN` reads a column of the matched row, e.g. `released:re_caption`.

Every shard reports how many of its samples matched; a shard whose share falls below
`data.min_recaption_coverage` stops training with an error naming the shard, the files and the
join column (a release of other images, or the wrong column, never trains silently on nothing).
The index holds only the join column and the columns the specs read; its identity for the
feature cache is each file's size and parquet footer (a digest of it), so edited files rebuild
the cache without rereading gigabytes.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
from pathlib import Path
from typing import Any

from t2i_recap.logging_utils import get_logger
from t2i_recap.sidecar_join import RecaptionCoverageError

log = get_logger(__name__)
JOIN_COLUMNS = ("sha256", "url")
_EPS = 1e-9
_INDEXES: dict[tuple, "ReleasedIndex"] = {}


class ReleasedCoverageError(RecaptionCoverageError):
    """Too few samples of a shard matched a row of the released captions (reported as a recaption
    coverage error by train and prepare: one line, exit status 2)."""


def expand(pattern: str) -> list[Path]:
    """The parquet files `pattern` names: a file, a folder (its *.parquet) or a glob; an error when none."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)))
    if not files:
        raise FileNotFoundError(f"data.released_captions={pattern!r} names no parquet file")
    return files


def identity(pattern: str) -> list[dict]:
    """What the index is made of, for the feature cache's fingerprint: per file its name, size and a
    digest of its parquet footer (the schema, row groups and their column statistics)."""
    out = []
    for f in expand(pattern):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(size - 8, 0))
            tail = fh.read(8)
            footer = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
            fh.seek(max(size - 8 - footer, 0))
            digest = hashlib.sha256(fh.read(footer + 8)).hexdigest()
        if tail[4:] != b"PAR1":
            raise ValueError(f"data.released_captions: {f} is not a parquet file")
        out.append({"name": f.name, "size": size, "footer": digest})
    return out


@dataclasses.dataclass
class ReleasedIndex:
    """Released rows by join value (sha256 or url), holding only the columns asked for."""

    files: list[Path]
    join_on: str
    rows: dict[str, dict]

    def lookup(self, meta: Any) -> dict | None:
        """The released row of a sample whose img2dataset `.json` is `meta` (None when it matches none)."""
        if not isinstance(meta, dict):
            return None
        value = meta.get(self.join_on)
        return self.rows.get(value) if isinstance(value, str) and value else None


def load_index(pattern: str, join_on: str, columns: list[str]) -> ReleasedIndex:
    """Read the join column and `columns` of the released parquet files (cached per process)."""
    import pyarrow.parquet as pq

    files = expand(pattern)
    key = (tuple(str(f) for f in files), join_on, tuple(sorted(columns)))
    if key in _INDEXES:
        return _INDEXES[key]
    rows: dict[str, dict] = {}
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in [join_on, *columns] if c not in names]
        if missing:
            raise ValueError(f"released captions {f} have no column(s) {missing} (columns: {names}); "
                             f"data.join_on must be one of {JOIN_COLUMNS} and released:COLUMN a column of the file")
        table = pq.read_table(f, columns=list(dict.fromkeys([join_on, *columns])))
        for row in table.to_pylist():
            value = row.get(join_on)
            if isinstance(value, str) and value and value not in rows:  # the first row of a value wins
                rows[value] = row
    log.info("released captions: %d rows by %s from %d file(s)", len(rows), join_on, len(files))
    index = ReleasedIndex(files, join_on, rows)
    _INDEXES[key] = index
    return index


@dataclasses.dataclass
class ReleasedCoverage:
    """Counts the samples of one shard that matched; `finish` reports and enforces the coverage."""

    index: ReleasedIndex
    shard: str
    min_coverage: float
    samples: int = 0
    matched: int = 0

    def add(self, row: dict | None) -> None:
        self.samples += 1
        self.matched += row is not None

    def finish(self) -> dict:
        share = self.matched / self.samples if self.samples else 1.0
        log.info("released captions: %d of %d samples of shard %s matched by %s (%.1f%%)", self.matched,
                 self.samples, self.shard, self.index.join_on, 100 * share)
        if self.samples and share + _EPS < self.min_coverage:
            raise ReleasedCoverageError(
                f"shard {self.shard}: only {self.matched} of {self.samples} samples match a row of the released "
                f"captions by {self.index.join_on} ({100 * share:.1f}% < data.min_recaption_coverage="
                f"{self.min_coverage}; files: {', '.join(f.name for f in self.index.files[:3])}"
                f"{' ...' if len(self.index.files) > 3 else ''}). Are these the parquet files of this download, "
                "and does its .json hold that column (img2dataset's compute_hash=sha256 writes sha256)?")
        return {"shard": self.shard, "samples": self.samples, "matched": self.matched}


def join_download(pattern: str, shards: str, join_on: str = "sha256", min_coverage: float = 0.0,
                  columns: tuple[str, ...] = ("org_caption", "re_caption")) -> tuple[list[dict], dict]:
    """The released rows of the samples of an img2dataset download (`shards`: folder, glob or brace
    pattern of tars), as sidecar-like rows (key, shard, status "ok", the released columns), and a
    report of how many samples matched; ReleasedCoverageError below `min_coverage` over all shards."""
    from t2i_recap.caption_specs import CaptionSpecError, SampleView
    from t2i_recap.io import expand_shards
    from t2i_recap.shards import iter_tar_samples, shard_id

    index = load_index(pattern, join_on, list(columns))
    rows, samples = [], 0
    for path in expand_shards(shards):
        for raw in iter_tar_samples(path):
            if raw.error:
                continue
            samples += 1
            try:
                row = index.lookup(SampleView(raw.files).json())
            except CaptionSpecError:
                row = None
            if row is not None:
                rows.append({**row, "key": raw.key, "shard": shard_id(path), "status": "ok"})
    share = len(rows) / samples if samples else 0.0
    report = {"files": [f.name for f in index.files], "join_on": join_on, "samples": samples, "matched": len(rows),
              "share": round(share, 4)}
    log.info("released captions: %d of %d samples of %s matched by %s", len(rows), samples, shards, join_on)
    if share + _EPS < min_coverage:
        raise ReleasedCoverageError(
            f"only {len(rows)} of {samples} samples of {shards} match a row of the released captions {pattern} by "
            f"{join_on} ({100 * share:.1f}% < {min_coverage}); are these the parquet files of this download?")
    return rows, report
