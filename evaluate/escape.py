"""Markdown escaping for the evaluation reports: `t2i_recap.markdown` (core, so the captioner's
pages use the same escaping); the names stay importable from here."""

from t2i_recap.markdown import clean_text, md_text  # noqa: F401
