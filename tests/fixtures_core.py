"""Core fixtures: the shapes tokenizer (fast to build, deterministic)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shapes_tokenizer_dir(tmp_path_factory):
    from t2i_recap.shapes.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out
