"""Recaption sidecars (DESIGN.md contract 2): one parquet per input shard, written atomically.

Columns follow Recap-DataComp-1B where they overlap (`key, org_caption, re_caption, re_length,
org_length`), plus `status` ("ok", "skipped": bad input, "failed": the model raised), `error`
(why), `finish_reason` ("stop"/"length"), `repetition`, `re_num_tokens` and `notes` (safe
conversions applied to the input). Lengths are word counts, as in the released dataset (mean 49.4
vs 10.2 words). Provenance (model, prompt, generation settings, counts, throughput) is JSON under
the parquet schema metadata key `t2i_recap`.

A sidecar only ever appears under its final name once the whole shard is captioned (temp file +
rename), so its presence means the shard is done: the resume rule img2dataset uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from t2i_recap.io import atomic_path

FORMAT = "t2i-recap-sidecar/1"
METADATA_KEY = b"t2i_recap"
STATUSES = ("ok", "skipped", "failed")

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("org_caption", pa.string()),
    ("re_caption", pa.string()),
    ("re_length", pa.int32()),
    ("org_length", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("finish_reason", pa.string()),
    ("repetition", pa.bool_()),
    ("re_num_tokens", pa.int32()),
    ("notes", pa.string()),
])


class SidecarMismatch(ValueError):
    """A finished sidecar exists but was written with other settings (model, prompt, ...)."""


@dataclasses.dataclass
class Row:
    key: str
    org_caption: str | None = None
    re_caption: str | None = None
    status: str = "ok"
    error: str | None = None
    finish_reason: str | None = None
    repetition: bool | None = None
    re_num_tokens: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        return {
            "key": self.key,
            "org_caption": self.org_caption,
            "re_caption": self.re_caption,
            "re_length": word_count(self.re_caption),
            "org_length": word_count(self.org_caption),
            "status": self.status,
            "error": self.error,
            "finish_reason": self.finish_reason,
            "repetition": self.repetition,
            "re_num_tokens": self.re_num_tokens,
            "notes": "; ".join(self.notes) or None,
        }


def word_count(text: str | None) -> int | None:
    return None if text is None else len(text.split())


def sidecar_path(out_dir: str | Path, shard_name: str) -> Path:
    return Path(out_dir) / f"{shard_name}.parquet"


def write_sidecar(path: str | Path, rows: list[Row], metadata: dict) -> None:
    """Write all rows of one shard; the file appears under `path` only when complete."""
    table = pa.Table.from_pylist([r.record() for r in rows], schema=SCHEMA)
    meta = {"format": FORMAT, **metadata}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_path(path, suffix=".tmp") as tmp:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; sidecars are shared data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_info(path: str | Path) -> dict | None:
    """The provenance JSON of a sidecar, or None if the parquet file is not one of ours."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    info = json.loads(raw)
    return info if info.get("format") == FORMAT else None


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete temp files a killed run left beside `path` (atomic_path names them `.NAME.*.tmp`)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.exists() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def is_finished(path: str | Path, fingerprint: dict) -> bool:
    """True if `path` is a complete sidecar written with the same settings.

    Raises `SidecarMismatch` for a sidecar made with other settings and for a parquet file that
    is not a sidecar (e.g. img2dataset's own `00000.parquet` when --out is the input folder).
    """
    path = Path(path)
    if not path.exists():
        return False
    info = read_info(path)
    if info is None:
        raise SidecarMismatch(f"{path} exists and is not a recaption sidecar (img2dataset metadata?); use another --out")
    theirs = info.get("fingerprint", {})
    if theirs != fingerprint:
        diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
        raise SidecarMismatch(
            f"{path} was captioned with other settings {diff} (found, wanted); use another --out or delete it"
        )
    return True
