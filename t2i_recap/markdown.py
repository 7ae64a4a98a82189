"""Markdown tables (GFM pipe tables), the one way every report, stats page and sweep writes one.

Cells are Markdown already: text from data or prompts is escaped by the caller first
(`t2i_recap.evaluate.escape.md_text` turns `|` into `\\|` and newlines into spaces). A cell that
would still break the table, an unescaped `|` or a line break, is refused rather than written.
"""

from __future__ import annotations

import re

_BARE_PIPE = re.compile(r"(?<!\\)\|")


def md_table(headers: list, rows: list[list]) -> list[str]:
    """The lines of a pipe table: header row, `|---|` rule, one line per row (cells str()-ed)."""
    width = len(headers)
    lines = [_row(headers, "header"), "|" + "---|" * width]
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"markdown table row {i} has {len(row)} cells for {width} columns: {row!r}")
        lines.append(_row(row, f"row {i}"))
    return lines


def _row(cells: list, where: str) -> str:
    texts = ["" if c is None else str(c) for c in cells]
    for text in texts:
        if "\n" in text or "\r" in text or _BARE_PIPE.search(text):
            raise ValueError(f"markdown table {where}: cell {text!r} has a line break or an unescaped '|'")
    return "| " + " | ".join(texts) + " |"
