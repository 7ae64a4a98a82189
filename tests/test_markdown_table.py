"""t2i_recap.markdown.md_table: the one Markdown table writer; cells that would break a table are refused."""

from __future__ import annotations

import pytest

from t2i_recap.evaluate.escape import md_text
from t2i_recap.markdown import md_table


def test_table_lines():
    assert md_table(["a", "b"], [[1, None], ["x", 2.5]]) == ["| a | b |", "|---|---|", "| 1 |  |", "| x | 2.5 |"]


def test_escaped_text_passes_and_raw_pipes_or_newlines_are_refused():
    assert md_table(["t"], [[md_text("a|b\nc")]]) == ["| t |", "|---|", "| a\\|b c |"]
    with pytest.raises(ValueError, match="unescaped"):
        md_table(["t"], [["a|b"]])
    with pytest.raises(ValueError, match="line break"):
        md_table(["t"], [["a\nb"]])
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        md_table(["a", "b"], [["x"]])
