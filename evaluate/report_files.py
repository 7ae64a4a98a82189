"""The report family of one evaluation: report.json (every number and its provenance), report.md
and report.html, written atomically side by side."""

from __future__ import annotations

import json
from pathlib import Path

from t2i_recap.io import atomic_write_text

from .report import render_markdown
from .report_html import render_report_html


def write_reports(report: dict, out_dir: Path) -> None:
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    atomic_write_text(out_dir / "report.html", render_report_html(report, out_dir))
