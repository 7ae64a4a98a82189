"""User prompt files as spreadsheets save them, and reports that show only what ran and never turn
text from prompts into markup: hostile prompts through report.md (rendered with the `markdown`
package) and report.html."""

from __future__ import annotations

import csv
import html
import json
import re
from html.parser import HTMLParser

import markdown
import numpy as np
import pytest
from PIL import Image

from t2i_recap.config import from_dict
from t2i_recap.evaluate.escape import md_text
from t2i_recap.evaluate.run import EvalConfig, run_eval
from t2i_recap.evaluate.suites import load_prompt_file

HOSTILE = [
    "![x](https://example.com/p.png) a red circle",
    "[click](https://example.com/x) a blue square",
    '<img src="https://example.com/i.png"> a green triangle',
    "<script>document.title='pwned'</script> two circles",
    "see https://example.com/a.png and www.example.com and <https://example.com/b>",
    "`code` and ``more`` | a | pipe | table",
    "# heading *bold* _em_ ~~strike~~ <b>b</b>",
    "1. a list - item + more",
    "- a list item",
]


def _noise(pipe, prompts, seeds, settings):
    return [Image.fromarray(np.random.default_rng(s).integers(0, 256, (settings.resolution,) * 2 + (3,), dtype=np.uint8))
            for s in seeds]


def _write_csv_with_bom(path, prompts):
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8"
        writer = csv.writer(fh)
        writer.writerow(["caption", "id"])
        writer.writerows([p, f"h{i}"] for i, p in enumerate(prompts))


def test_csv_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "prompts.csv"
    _write_csv_with_bom(path, ["a red circle", "a blue square"])
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    suite = load_prompt_file(path)
    assert [r.prompt for r in suite.records] == ["a red circle", "a blue square"]
    assert [r.id for r in suite.records] == ["h0", "h1"]


@pytest.mark.parametrize("suffix,text", [(".txt", "a red circle\n"), (".jsonl", '{"prompt": "a red circle"}\n'),
                                         (".json", '[{"prompt": "a red circle"}]')])
def test_other_text_files_with_byte_order_mark_load(tmp_path, suffix, text):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r.prompt for r in load_prompt_file(path).records] == ["a red circle"]


class _Live(HTMLParser):
    """Every element of a rendered page that can fetch or link to something."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, name, attrs):
        attrs = dict(attrs)
        inline_image = name == "img" and str(attrs.get("src", "")).startswith("data:image/png;base64,")
        if inline_image:
            return
        if name in ("img", "script", "a", "iframe", "link", "object", "embed", "source", "video", "audio") \
                or any(k in attrs for k in ("href", "src", "srcset", "action", "background")):
            self.found.append((name, attrs))


def _live(page: str) -> list:
    parser = _Live()
    parser.feed(page)
    return parser.found


@pytest.mark.parametrize("text", HOSTILE)
def test_md_text_renders_as_the_text_itself(text):
    rendered = markdown.markdown(md_text(text))
    assert _live(rendered) == [], rendered
    assert not re.search(r"<(h\d|strong|em|code|del|b)>", rendered), rendered
    # what a reader sees is the prompt's own text (outside tables Python-Markdown leaves the
    # CommonMark escapes `\:`, `\@` and `\|` as they are)
    shown = re.sub(r"<[^>]+>", "", rendered)
    for ch in ":@|~":
        shown = shown.replace("\\" + ch, ch)
    assert html.unescape(shown) == text


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, eval_pipeline_dir, eval_clip_dir):
    """A CLIP-only run (no oracle: the prompts carry no constraints) on a BOM CSV of hostile prompts."""
    tmp = tmp_path_factory.mktemp("hostile")
    prompts = tmp / "hostile.csv"
    _write_csv_with_bom(prompts, HOSTILE)
    cfg = from_dict(EvalConfig, dict(model=str(eval_pipeline_dir), out=str(tmp / "eval"), suite=str(prompts),
                                     images_per_prompt=1, batch_size=8, clip=str(eval_clip_dir)))
    path = run_eval(cfg, generate=_noise)
    return json.loads(path.read_text()), path.parent


def test_worst_table_shows_the_columns_of_its_metric(hostile_run):
    report, out = hostile_run
    assert "oracle_accuracy" not in report["variants"]["raw"]["metrics"]
    md = (out / "report.md").read_text()
    worst = md.split("## Worst prompts", 1)[1]
    header = next(line for line in worst.splitlines() if line.startswith("| id"))
    assert "CLIP score" in header and "accuracy" not in header and "constraints met" not in header
    rows = [line for line in worst.splitlines() if line.startswith("| h")]
    assert rows and all(not line.rstrip(" |").endswith("-") for line in rows)  # real numbers, not '-'
    scores = [float(re.split(r"(?<!\\)\|", line)[4]) for line in rows]
    assert scores == sorted(scores)


def test_legend_names_only_metrics_that_ran(hostile_run, tmp_path):
    _, out = hostile_run
    page = (out / "report.html").read_text()
    assert "oracle" not in page.lower(), re.findall(r".{40}oracle.{40}", page, flags=re.I)
    assert "Worst failures" in page and "CLIP score" in page


def test_hostile_prompts_give_no_live_reference(hostile_run):
    _, out = hostile_run
    md = (out / "report.md").read_text()
    rendered = markdown.markdown(md, extensions=["tables"])
    assert _live(rendered) == [], _live(rendered)
    assert "<table" in rendered  # the pipes in a prompt did not break the tables
    page = (out / "report.html").read_text()
    assert _live(page) == [], _live(page)
    assert "example.com" in page  # the text is shown, inert
