"""Recaption sidecars (DESIGN.md contract 2): one parquet per input shard, written atomically.

Columns follow Recap-DataComp-1B where they overlap (`key, org_caption, re_caption, re_length,
org_length`), plus `status` ("ok", "skipped": bad input, "failed": the model raised), `error`
(why), `finish_reason` ("stop"/"length"), `repetition`, `re_num_tokens` and `notes` (safe
conversions applied to the input). Lengths are word counts, as in the released dataset (mean 49.4
vs 10.2 words). Provenance (model, prompt, generation settings, counts, throughput) is JSON under
the parquet schema metadata key `t2i_recap`.

A sidecar only ever appears under its final name once the whole shard is captioned (temp file +
rename; in an object store one PUT of the whole object to its final key, `t2i_recap.storage`), so
its presence means the shard is done: the resume rule img2dataset uses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from t2i_recap import sidecar_format, storage
from t2i_recap.identity import same_content
from t2i_recap.io import atomic_path
from t2i_recap.logging_utils import get_logger
from t2i_recap.sidecar_format import FORMAT, METADATA_KEY  # noqa: F401  (the contract)

log = get_logger(__name__)
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
    ("url", pa.string()),
    ("sha256", pa.string()),
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
    url: str | None = None
    """The input's download url (img2dataset's .json), for joining the released captions."""
    sha256: str | None = None
    """The input's image sha256 (img2dataset's .json), for joining the released captions."""

    def record(self) -> dict:
        notes = list(self.notes)
        key, org, rec, err, url, sha = (_storable(getattr(self, f), f, notes)
                                        for f in ("key", "org_caption", "re_caption", "error", "url", "sha256"))
        return {
            "key": key,
            "org_caption": org,
            "re_caption": rec,
            "re_length": word_count(rec),
            "org_length": word_count(org),
            "status": self.status,
            "error": err,
            "finish_reason": self.finish_reason,
            "repetition": self.repetition,
            "re_num_tokens": self.re_num_tokens,
            "notes": _storable("; ".join(notes), "notes", []) or None,
            "url": url,
            "sha256": sha,
        }


def _storable(text: str | None, field: str, notes: list[str]) -> str | None:
    """`text` as parquet can store it: a lone surrogate (JSON "\\ud800" decodes to one) has no UTF-8
    form and would make the whole shard's write fail, so it becomes U+FFFD, with a note."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        notes.append(f"{field}: lone surrogate replaced by U+FFFD")
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def word_count(text: str | None) -> int | None:
    return None if text is None else len(text.split())


def sidecar_path(out_dir: str | Path, shard_name: str) -> Path | str:
    """`<out>/<shard id>.parquet`; `shard_name` is `t2i_recap.shards.shard_id` of the input shard.

    A local `out_dir` gives a Path, an object-store URL (`s3://bucket/sidecars`) a URL string."""
    return storage.join(storage.as_location(out_dir), f"{shard_name}.parquet")


def read_info(path: str | Path) -> dict | None:
    """The provenance JSON of a sidecar (a local file or an object), None if it is not one of ours."""
    if not storage.is_url(path):
        return sidecar_format.read_info(path)
    with storage.open_seekable(path) as fh:  # the footer is at the end: a seekable read of a few KB
        return sidecar_format.read_info(fh)


def write_sidecar(path: str | Path, rows: list[Row], metadata: dict) -> None:
    """Write all rows of one shard; the file (or object) appears under `path` only when complete."""
    table = pa.Table.from_pylist([r.record() for r in rows], schema=SCHEMA)
    meta = {"format": FORMAT, **metadata}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    if storage.is_url(path):
        storage.write_parquet(str(path), table)  # serialised in memory, then one PUT to the final key
        return
    with atomic_path(path, suffix=".tmp") as tmp:  # gives it the umask's mode: sidecars are shared data
        pq.write_table(table, tmp)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete temp files a killed run left beside `path` (atomic_path names them `.NAME.*.tmp`).

    An object store has none: a sidecar object is sent whole, and an upload cut short is never visible."""
    if storage.is_url(path):
        return []
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.exists() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def is_finished(path: str | Path, fingerprint: dict, *, model_path: str | Path | None = None,
                shard_file: str | Path | None = None) -> bool:
    """True if `path` is a complete sidecar written with the same settings from the same input.

    False (redo it, with a warning) when the input shard's content changed since the sidecar was
    written, or when the captioner at the same place (`model_path`) was replaced. Raises
    `SidecarMismatch` for a sidecar made with other settings or by another captioner elsewhere,
    and for a parquet file that is not a sidecar (e.g. img2dataset's own `00000.parquet` when
    --out is the input folder).
    """
    return stale_reason(path, fingerprint, model_path=model_path, shard_file=shard_file) is None


def stale_reason(path: str | Path, fingerprint: dict, *, model_path: str | Path | None = None,
                 shard_file: str | Path | None = None) -> str | None:
    """None if the sidecar at `path` is finished and current, else why the shard must be (re)captioned."""
    path = storage.as_location(path)
    if not storage.exists(path):
        return "no sidecar yet"
    info = read_info(path)
    if info is None:
        raise SidecarMismatch(f"{path} exists and is not a recaption sidecar (img2dataset metadata?); use another --out")
    theirs = info.get("fingerprint", {})
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if set(diff) == {"model"} and model_path is not None and _same_place(info.get("model_path") or info.get("model"),
                                                                         model_path):
        log.warning("%s was captioned by the captioner at %s before it was replaced (digest %s, now %s); recaptioning",
                    path, model_path, *diff["model"])
        return "the captioner was replaced in place"
    if diff:
        raise SidecarMismatch(
            f"{path} was captioned with other settings {diff} (found, wanted); use another --out or delete it"
        )
    if shard_file is not None and storage.is_file(storage.as_location(shard_file)):
        recorded = (info.get("shard") or {}).get("input") or {}
        if not same_content(shard_file, recorded):
            log.warning("shard %s changed since %s was written (recorded digest %s); recaptioning", shard_file,
                        path, recorded.get("digest"))
            return "the input shard changed since it was captioned"
    return None


def _same_place(recorded: str | None, current: str | Path) -> bool:
    if not recorded:
        return False
    try:
        return Path(recorded).resolve() == Path(current).resolve()
    except OSError:
        return False
