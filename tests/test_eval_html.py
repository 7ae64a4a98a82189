"""report.html in a real browser: headless Chromium (Debian package `chromium`) parses the page,
finds the tables and charts, runs no script from a prompt, and renders a non-blank screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_recap.config import from_dict
from t2i_recap.evaluate.run import EvalConfig, run_eval

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")

HOSTILE = ["<script>document.title='pwned'</script>a red circle",
           '<img src=x onerror="document.title=\'pwned\'">a blue square', "a green\x07 triangle"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _elements(dom: str) -> list[tuple[str, list[str]]]:
    """Every element the browser built, with its attribute names."""
    from html.parser import HTMLParser

    found = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, [name for name, _ in attrs]))

    Collector().feed(dom)
    return found


def _noise(pipe, prompts, seeds, settings):
    return [Image.fromarray(np.random.default_rng(s).integers(0, 256, (settings.resolution,) * 2 + (3,), dtype=np.uint8))
            for s in seeds]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory, eval_pipeline_dir, eval_clip_dir):
    tmp = tmp_path_factory.mktemp("html")
    prompts = tmp / "p.jsonl"
    rows = [{"id": f"h{i}", "prompt": p, "recaption": f"recap of {p}"} for i, p in enumerate(HOSTILE)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(EvalConfig, {"model": str(eval_pipeline_dir), "suite": str(prompts), "out": str(tmp / "eval"),
                                 "images_per_prompt": 2, "clip": str(eval_clip_dir), "reference": "none"})
    return run_eval(cfg, generate=_noise).parent / "report.html"


def test_dom_has_tables_charts_images_and_no_live_script(report_html, tmp_path):
    done = _chromium(tmp_path, "--dump-dom", report_html.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert dom.count("<table") >= 3 and "<svg" in dom and "data:image/png;base64," in dom
    tags = _elements(dom)
    assert "script" not in {t for t, _ in tags} and not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    assert sum(t == "img" for t, _ in tags) >= 12  # 3 prompts x 2 images x 2 forms, in the grids
    assert "<title>t2i-recap evaluation report</title>" in dom  # no prompt script retitled the page
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;a red circle" in dom


def test_screenshot_is_not_blank(report_html, tmp_path):
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", report_html.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # text, tables and images, not an empty white page
