"""`t2i-recap eval compare RUN... --out DIR`: one table across evaluation runs, like the paper's
Table 7 (rows: runs or caption-mixing p values; columns: metrics for raw and recaptioned prompts).

Intervals are the runs' own bootstrap intervals over prompts. When runs share a suite, the
headline metric also gets a paired difference against the first run, bootstrapped over the
same prompts (a tighter test than comparing two intervals). Writes compare.json, compare.md and
compare.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
from pathlib import Path

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.config import ConfigError
from t2i_recap.io import atomic_write_text
from t2i_recap.markdown import md_table
from t2i_recap.logging_utils import setup_logging

from . import retrieval
from .report import LABELS, fmt_metric, md_cell, versions
from .stats import mean_ci

# Keys an export's t2i_recap.json may use for the share of original captions (the paper's p).
P_KEYS = ("caption_p", "caption_mix_p", "p", "original_caption_prob", "p_original", "mix_p")
COLUMNS = ("oracle_geneval", "oracle_fraction", "oracle_objects_exact", "oracle_objects", "clip_score", "vqa", "vqa_derived", "fd_clip", "cmmd", "fid")


def load_run(path: str | Path) -> dict:
    path = Path(path)
    report_path = path / "report.json" if path.is_dir() else path
    if not report_path.is_file():
        raise FileNotFoundError(f"eval run {path}: {report_path} does not exist (run `t2i-recap eval run` first)")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if report.get("kind") != "t2i-recap eval run":
        raise ValueError(f"{report_path} is not a t2i-recap evaluation report")
    report["_path"] = str(report_path.parent)
    return report


def run_label(report: dict) -> tuple[str, float | None]:
    sidecar = report["provenance"]["model"].get("sidecar", {})
    for key in P_KEYS:
        value = sidecar.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"p={value:.2f}", float(value)
    return Path(report["_path"]).name, None


def _headline(reports: list[dict]) -> str | None:
    for key in ("oracle_accuracy", "clip_score", "vqa"):
        if all(key in v["metrics"] for r in reports for v in r["variants"].values()):
            return key
    return None


def paired_difference(base: dict, other: dict, metric: str, seed: int = 0) -> dict | None:
    """Mean over shared prompts of other - base, with a bootstrap interval."""
    a = {p["id"]: p.get(metric) for p in base["prompts"]}
    b = {p["id"]: p.get(metric) for p in other["prompts"]}
    diffs = [b[k] - a[k] for k in a if k in b and a[k] is not None and b[k] is not None]
    return mean_ci(diffs, seed=seed) if diffs else None


def compare(runs: list[str | Path], labels: list[str] | None = None, allow_different_suites: bool = False) -> dict:
    reports = [load_run(r) for r in runs]
    if labels and len(labels) != len(reports):
        raise ValueError(f"--labels has {len(labels)} names for {len(reports)} runs")
    suites = {r["provenance"]["suite"]["sha256"] for r in reports}
    if len(suites) > 1 and not allow_different_suites:
        names = ", ".join(f"{r['_path']}: {r['provenance']['suite']['sha256'][:12]}" for r in reports)
        raise ValueError(f"runs were scored on different prompt suites ({names}); per-prompt metrics are not "
                         "comparable (pass --allow-different-suites to tabulate anyway)")
    entries = []
    for i, r in enumerate(reports):
        label, p = (labels[i], None) if labels else run_label(r)
        entries.append({"label": label, "p": p, "path": r["_path"], "report": r})
    seen = [e["label"] for e in entries]
    for e in entries:  # rows (and chart series) need distinct names
        if seen.count(e["label"]) > 1:
            e["label"] = f"{e['label']} ({Path(e['path']).name})"
    if all(e["p"] is not None for e in entries):  # Table 7 order: by p
        entries.sort(key=lambda e: e["p"])
    headline = _headline(reports)
    rows = []
    base = entries[0]
    for e in entries:
        row = {"label": e["label"], "p": e["p"], "path": e["path"],
               "model_sha256": e["report"]["provenance"]["model"]["sha256"], "variants": {}}
        for vname, v in e["report"]["variants"].items():
            cell = {k: v["metrics"].get(k, v["set_metrics"].get(k)) for k in COLUMNS
                    if k in v["metrics"] or k in v["set_metrics"]}
            if headline and len(suites) == 1 and e is not base and vname in base["report"]["variants"]:
                cell["paired_diff"] = paired_difference(base["report"]["variants"][vname], v, headline)
            cell["by_category"] = {c: m.get(headline) for c, m in v["by_category"].items()} if headline else {}
            row["variants"][vname] = cell
        rows.append(row)
    return {"kind": "t2i-recap eval compare", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "headline": headline, "baseline": base["label"], "same_suite": len(suites) == 1,
            "suites": sorted(suites), "rows": rows, "versions": versions()}


def table_columns(result: dict) -> list[tuple[str, str]]:
    cols = []
    for row in result["rows"]:
        for vname, cell in row["variants"].items():
            for k in [*COLUMNS, "paired_diff"]:
                if k in cell and (vname, k) not in cols:
                    cols.append((vname, k))
    order = {k: i for i, k in enumerate([*COLUMNS, "paired_diff"])}
    return sorted(cols, key=lambda c: (c[0] != "raw", c[0], order[c[1]]))


def _col_name(result: dict, col: tuple[str, str]) -> str:
    vname, k = col
    name = f"Δ {LABELS.get(result['headline'], result['headline'])} vs {result['baseline']}" if k == "paired_diff" else LABELS.get(k, k)
    return f"{vname}: {name}"


def render_markdown(result: dict) -> str:
    cols = table_columns(result)
    lines = ["# Comparison", "", "Mean [95% bootstrap CI over prompts]; FD-CLIP, CMMD and FID are set-level "
             "(lower is better).", ""]
    lines += md_table(["run", *(md_cell(_col_name(result, c)) for c in cols)],
                      [[md_cell(row["label"]), *(fmt_metric(row["variants"].get(v, {}).get(k)) for v, k in cols)]
                       for row in result["rows"]])
    if not result["same_suite"]:
        lines += ["", "Warning: the runs used different prompt suites."]
    return "\n".join(lines) + "\n"


def render_html(result: dict) -> str:
    from .report_html import bar_chart, metric_cell, render

    cols = table_columns(result)
    groups = [{"name": g, "span": sum(v == g for v, _ in cols)} for g in dict.fromkeys(v for v, _ in cols)]
    rows = [{"label": row["label"], "cells": [metric_cell(row["variants"].get(v, {}).get(k)) for v, k in cols]}
            for row in result["rows"]]
    charts = []
    headline = result["headline"]
    if headline:
        variants = list(dict.fromkeys(v for row in result["rows"] for v in row["variants"]))
        for vname in variants:
            cats = list(dict.fromkeys(c for row in result["rows"] for c in row["variants"].get(vname, {}).get("by_category", {})))
            series = {row["label"]: row["variants"].get(vname, {}).get("by_category", {}) for row in result["rows"]}
            charts.append({"title": f"{LABELS.get(headline, headline)} by category, {vname} prompts",
                           "svg": bar_chart(cats, series, LABELS.get(headline, headline), suffix="")})
    return render("compare.html", title="t2i-recap comparison", groups=groups, rows=rows,
                  column_names=[_col_name(result, c).split(": ", 1)[1] for c in cols],
                  same_suite=result["same_suite"], charts=charts,
                  runs=[[row["label"], row["path"], row["model_sha256"][:16]] for row in result["rows"]])


def write_compare(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=1))
    atomic_write_text(out / "compare.md", render_markdown(result))
    atomic_write_text(out / "compare.html", render_html(result))
    for name in ("compare.json", "compare.md", "compare.html"):
        (out / name).chmod(0o644)


@dataclasses.dataclass
class CompareConfig:
    """What `t2i-recap eval compare` tabulates (its arguments, or --config / --set)."""

    runs: list[str] = dataclasses.field(default_factory=list)
    """Eval run folders (each with report.json)."""
    out: str = ""
    """Folder for compare.json/.md/.html."""
    labels: str | None = None
    """Comma-separated row names, one per run (default: p from the export, else the folder name)."""
    allow_different_suites: bool = False
    """Tabulate runs scored on different prompt suites (their per-prompt metrics are not comparable)."""


FLAGS = {"runs": "runs", "--out": "out", "--labels": "labels", "--allow-different-suites": "allow_different_suites"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-recap eval compare", description=__doc__.split("\n\n")[0])
    add_config_arguments(ap, CompareConfig, FLAGS, required=("runs", "--out"))
    return ap


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ap = build_parser()
    try:
        args = config_from_args(CompareConfig, ap.parse_args(argv))
    except ConfigError as exc:
        ap.error(str(exc))
    if any(retrieval.is_retrieval_report(r) for r in args.runs):  # CLIP runs: their own table
        return retrieval.compare_main(args.runs, args.labels.split(",") if args.labels else None, Path(args.out))
    try:
        result = compare(args.runs, args.labels.split(",") if args.labels else None, args.allow_different_suites)
    except (FileNotFoundError, ValueError) as exc:
        print(f"t2i-recap eval compare: error: {exc}", file=sys.stderr)
        return 2
    write_compare(result, Path(args.out))
    print(render_markdown(result))
    print(f"report: {Path(args.out) / 'compare.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
