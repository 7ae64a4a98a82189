"""evaluate/report_html.py's Jinja2 templates: autoescape on, control characters made visible, only the
macros' own markup inserted as markup, and a missing template variable is an error, not a blank."""

from __future__ import annotations

import jinja2
import pytest

from t2i_recap.evaluate.report_html import ENV, MACROS, render, table


def test_text_is_escaped_and_control_characters_shown():
    html = str(table(["<b>h</b>", "n"], [["<script>alert(1)</script>\x07", None]]))
    assert "<script>" not in html and "&lt;script&gt;" in html and "\\x07" in html and "<b>" not in html
    assert html.startswith("<table><thead><tr><th>&lt;b&gt;h") and 'class="num"' in html


def test_macro_markup_nests_but_attributes_are_escaped():
    cell = MACROS.div('"><img src=x onerror=alert(1)>', cls='x" onclick="y')
    html = str(table(["a"], [[cell]], num_cols=()))
    assert "<div class=" in html and "onerror=alert(1)>" not in html and 'onclick="y"' not in html


def test_autoescape_is_on_and_undefined_is_strict():
    assert ENV.autoescape is True
    with pytest.raises(jinja2.UndefinedError):
        render("compare.html", title="t")  # the comparison's rows are missing
