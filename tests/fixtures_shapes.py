"""Shapes-world fixtures shared by every area: a small dataset in img2dataset layout."""

from __future__ import annotations

import pytest

SHAPES_SHARDS_NUM = 64
SHAPES_SHARDS_SHARD_SIZE = 32
SHAPES_SHARDS_CURATED = 0.25


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """Folder with 64 samples (seed 0) in 2 shards of 32 (00000.tar/.parquet/_stats.json, ...);
    a quarter of them curated (json holds gold_caption and curated: true). Treat as read-only."""
    from t2i_recap.shapes.make import make_dataset

    out = tmp_path_factory.mktemp("shapes_shards")
    make_dataset(out, SHAPES_SHARDS_NUM, seed=0, curated_fraction=SHAPES_SHARDS_CURATED,
                 shard_size=SHAPES_SHARDS_SHARD_SIZE, progress=False)
    return out
