"""The recaption sidecar contract (docs/DESIGN.md contract 2), shared by the writer and the readers.

The captioner writes one parquet per input shard; the trainer, `caption stats` and the feature
cache read them. What both sides must agree on lives here, in the core package, so a reader never
imports the captioner: the format tag, the schema-metadata key holding the provenance JSON, and how
that JSON is read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

FORMAT = "t2i-recap-sidecar/1"
METADATA_KEY = b"t2i_recap"


def read_info(path: str | Path) -> dict | None:
    """The provenance JSON of a sidecar, or None if the parquet file is not one of ours."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    info = json.loads(raw)
    return info if info.get("format") == FORMAT else None
