"""The main job's output is not buried in library notices: each part loads the way its library
expects (the CLIP text tower from its own CLIPTextModel folder), the one understood diffusers type
notice is filtered by its exact text, and `t2i-recap demo --quick` prints stage lines, progress and
its summary in a bounded number of lines."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

NOISE = ("UNEXPECTED", "LOAD REPORT", "Expected types for", "clean_caption", "Beautiful Soup", "BeautifulSoup",
         "Token indices sequence length")


def test_assets_provide_the_text_tower_as_its_own_folder(shapes_assets, capfd):
    from transformers import CLIPModel

    import json

    from t2i_recap.shapes.assets import read_manifest
    from t2i_recap.text_encoders import TextEncoder, TextEncoderConfig

    text_dir = shapes_assets / "clip_text"
    assert (text_dir / "config.json").is_file() and (text_dir / "model.safetensors").is_file()
    manifest = read_manifest(shapes_assets)
    record = json.loads((text_dir / "derived_from.json").read_text())
    assert record["source_fingerprint"] == manifest["parts"]["clip"]["fingerprint"]
    capfd.readouterr()
    enc = TextEncoder(TextEncoderConfig(name_or_path=str(text_dir)))
    err = capfd.readouterr().err
    assert not any(n in err for n in NOISE), err
    # the same weights as the whole CLIP's text tower
    clip = CLIPModel.from_pretrained(str(shapes_assets / "clip"))
    for name, value in clip.text_model.state_dict().items():
        assert value.equal(enc.model.state_dict()[name]), name


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_the_clip_in_pixart_notice_is_dropped_and_nothing_else():
    from t2i_recap.logging_utils import install_library_filters

    install_library_filters()
    install_library_filters()  # idempotent
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")  # diffusers' loggers do not propagate
    from t2i_recap.logging_utils import _ClipInPixArtFilter

    assert sum(isinstance(f, _ClipInPixArtFilter) for f in logger.filters) == 1
    seen = _Records()
    logger.addHandler(seen)
    try:
        logger.warning("Expected types for text_encoder: (<class 'transformers.models.t5.modeling_t5."
                       "T5EncoderModel'>,), got <class 'transformers.models.clip.modeling_clip.CLIPTextModel'>.")
        logger.warning("Expected types for vae: (<class 'AutoencoderKL'>,), got <class 'Foo'>.")
        logger.warning("something else entirely")
    finally:
        logger.removeHandler(seen)
    messages = [r.getMessage() for r in seen.records]
    assert messages == ["Expected types for vae: (<class 'AutoencoderKL'>,), got <class 'Foo'>.",
                        "something else entirely"]


@pytest.mark.slow
def test_demo_quick_output_is_the_job_not_library_noise(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2i_recap", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=900, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    found = {n: sum(n in line for line in lines) for n in NOISE}
    assert not any(found.values()), found
    assert "stage world: running" in text and "stage compare" in text and "Report:" in text
    # Progress bars add lines with the machine's speed; the rest was 322 lines before the text tower
    # got its own folder (135 of them transformers' unexpected-keys report), 163-257 after (the
    # stages' JSON summaries and retry notices vary with load). The NOISE patterns above are the
    # precise check; this bound catches a new flood of any other kind.
    job = [line for line in lines if not re.search(r"[0-9]+%\|", line)]
    assert len(job) < 300, len(job)
