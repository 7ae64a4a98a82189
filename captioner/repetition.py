"""Greedy repetition loops: a caption that ran to the token cap while repeating itself.

docs/references.md section 3: greedy decoding at scale falls into loops ("a red car, a red car, a red
car, ...") that run to max_new_tokens. Detect: hit the cap AND repeated n-grams. A long caption
that merely hit the cap is not flagged.
"""

from __future__ import annotations

import re

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _units(text: str) -> list[str]:
    """Words and punctuation; text without spaces (byte soup, CJK) falls back to characters."""
    units = _TOKEN_RE.findall(text.lower())
    return units if len(units) >= 8 else list(text)


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of the text's n-grams that already appeared earlier in it."""
    units = _units(text)
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def has_repeating_tail(text: str, min_repeats: int = 3, max_period: int = 30) -> bool:
    """True if the text ends in the same span repeated `min_repeats` times or more."""
    units = _units(text)
    for period in range(1, min(max_period, len(units) // min_repeats) + 1):
        tail = units[-period:]
        if all(units[-(k + 1) * period : len(units) - k * period] == tail for k in range(1, min_repeats)):
            return True
    return False


def is_repetitive(text: str, finish_reason: str, n: int = 3, threshold: float = 0.4) -> bool:
    if finish_reason != "length":
        return False
    return has_repeating_tail(text) or repeated_ngram_fraction(text, n) >= threshold
