"""t2i_recap.markdown: the one Markdown table writer (cells that would break a table are refused) and its
text escaping, which caption fidelity uses for model output."""

from __future__ import annotations

import pytest

from t2i_recap.markdown import md_table, md_text


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


def test_fidelity_markdown_escapes_model_output():
    from t2i_recap.captioner.fidelity import render_markdown

    class Sample:
        key, num_objects, exact, problems, errors = "k1", 1, False, ["missed a circle"], {}
        caption = "![x](https://evil.example/p.png) [click](http://evil.example) <b>red</b>"

    agg = {"captions": 1, "exact_match": 0.0, "scene_match": 0.0, "clean_parse": 1.0,
           "errors": dict.fromkeys(("hallucinated", "missed", "wrong_color", "wrong_shape", "wrong_size",
                                    "wrong_position", "false_relations"), 0)}
    md = render_markdown({"overall": agg, "by_object_count": {}}, [Sample()], {"captions_from": "m", "shards": "s"})
    assert "](" not in md and "<b>" not in md and "https\\://" in md
