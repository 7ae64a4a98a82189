"""Markdown from data: inert text and pipe tables, the one way every report, stats page and sweep
writes Markdown.

`md_text(text)`: text from data or prompts that shows as the text it is and never becomes markup,
a live link or a remote image:

  * Control characters are made visible (`\\x07`), so they can neither hide text nor break a line.
  * HTML is escaped (`<img>` shows as text; Markdown passes raw HTML through to the page).
  * Every ASCII punctuation character that Markdown gives a meaning inside a line is
    backslash-escaped (CommonMark 0.31 "Backslash escapes": any ASCII punctuation may be escaped),
    so `![x](url)`, `[x](url)`, emphasis, code spans and table pipes stay literal; so is a leading
    `#`, `-`, `+` or `1.` (a heading or list where the text starts a line).
  * Autolinks are neutralised: `<https://...>` is already HTML-escaped; GFM's extended autolinks
    (`https://...`, `www.`, e-mail; GFM spec section 6.9) start at `:`, `www.` and `@`, which are
    escaped here (`https\\://`, `www\\.`, `a\\@b`), so a renderer reads them as plain text.

`md_table(headers, rows)`: a GFM pipe table whose cells are Markdown already (text escaped with
`md_text` first, which turns `|` into `\\|` and newlines into spaces). A cell that would still
break the table, an unescaped `|` or a line break, is refused rather than written.
"""

from __future__ import annotations

import html
import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# html.escape has already turned & < > " ' into entities; escaping their `&`/`;` again would
# double-escape them, so those two are left out (an entity is not markup in Markdown).
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()!|~])")
_LINE_START = re.compile(r"^(\s*)([#+\-]|\d+(?=[.)]))")
_AUTOLINK_START = re.compile(r"(:(?=//)|@|(?<=www)\.)", re.IGNORECASE)


def clean_text(text) -> str:
    """Control characters made visible (\\x07), so they can neither hide text nor break a line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def md_text(text) -> str:
    """`text` as inert Markdown inline text (one line: newlines become spaces)."""
    one_line = clean_text("" if text is None else text).replace("\n", " ").replace("\r", " ")
    escaped = _MD_PUNCT.sub(r"\\\1", html.escape(one_line, quote=True))
    escaped = _AUTOLINK_START.sub(r"\\\1", escaped)
    return _LINE_START.sub(lambda m: m.group(1) + (m.group(2) + "\\" if m.group(2)[0].isdigit() else "\\" + m.group(2)),
                           escaped, count=1)

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
