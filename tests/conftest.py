"""Shared test set-up. Fixtures live in tests/fixtures_<area>.py, one file per area, and are
gathered here so every test file sees them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here or in CI: every model is built locally
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Each fixtures_<area>.py is a pytest plugin: its fixtures reach every test file.
pytest_plugins = sorted(path.stem for path in HERE.glob("fixtures_*.py"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
