"""Assets fixtures: the real tiny tokenizer, CLIP and VAE, built once per test session.

Set T2I_RECAP_ASSETS_CACHE=/some/folder to keep them between sessions: build_assets reuses the
folder when its fingerprint matches, so a warm run costs a second instead of a few minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_assets(tmp_path_factory) -> Path:
    """Folder with tokenizer/, clip/, vae/ and assets.json (default AssetsConfig)."""
    from t2i_recap.shapes.assets import build_assets

    cache = os.environ.get("T2I_RECAP_ASSETS_CACHE")
    out = Path(cache) if cache else tmp_path_factory.mktemp("shapes_assets")
    return build_assets(out)
