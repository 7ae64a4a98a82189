"""The evaluation report: report.json (every number and where it came from), report.md and a
self-contained report.html (see `report_html`).

Per-prompt values are the mean over that prompt's images; aggregates are means over prompts
with bootstrap intervals (`stats`). The oracle's headline is GenEval's: the mean of the category
accuracies. Set-level distances (FID, FD-CLIP, CMMD) have no per-prompt value and no interval.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from pathlib import Path

from t2i_recap.markdown import clean_text, md_table, md_text  # noqa: F401  (clean_text: re-exported)

from .stats import category_mean_ci, mean_ci

SCHEMA_VERSION = 1
# Per-prompt metrics: (report name, row key, how to read a row). Higher is better for all four.
PROMPT_METRICS = {
    "oracle_accuracy": lambda row: row["oracle"]["correct"] if "oracle" in row else None,
    "oracle_fraction": lambda row: row["oracle"]["fraction"] if "oracle" in row else None,
    "oracle_objects": lambda row: row["oracle"].get("objects") if "oracle" in row else None,
    "clip_score": lambda row: row.get("clip"),
    "vqa": lambda row: row.get("vqa"),
    "vqa_derived": lambda row: row.get("vqa_derived"),
}
LABELS = {"oracle_accuracy": "oracle accuracy", "oracle_geneval": "oracle (GenEval mean)",
          "oracle_fraction": "constraints met", "oracle_objects_exact": "dense: exact",
          "oracle_objects": "dense: objects found",
          "clip_score": "CLIP score", "vqa": "VQA score",
          "vqa_derived": "VQA (questions)", "fd_clip": "FD-CLIP", "cmmd": "CMMD", "fid": "FID"}
LOWER_IS_BETTER = {"fd_clip", "cmmd", "fid"}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("t2i-recap", "torch", "diffusers", "transformers", "torchmetrics", "numpy", "pillow",
                 "torch-fidelity"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def prompt_summaries(rows: list[dict]) -> list[dict]:
    """One entry per prompt: its metrics (mean over images) and every image's own numbers."""
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["index"], []).append(row)
    out = []
    for index in sorted(by_prompt):
        group = by_prompt[index]
        first = group[0]
        entry = {k: first[k] for k in ("index", "id", "category", "prompt", "raw_prompt")}
        for name, read in PROMPT_METRICS.items():
            entry[name] = _mean([read(r) for r in group])
        entry["images"] = [{k: r.get(k) for k in ("k", "seed", "image", "clip", "vqa", "vqa_derived")}
                           | ({"oracle": r["oracle"]} if "oracle" in r else {}) for r in group]
        out.append(entry)
    return out


def _aggregate(prompts: list[dict], seed: int) -> tuple[dict, dict]:
    metrics, by_cat = {}, {}
    categories = sorted({p["category"] for p in prompts}, key=[p["category"] for p in prompts].index)
    for name in PROMPT_METRICS:
        values = [p[name] for p in prompts]
        if all(v is None for v in values):
            continue
        metrics[name] = mean_ci(values, seed=seed)
        groups = {c: [p[name] for p in prompts if p["category"] == c] for c in categories}
        for c, vals in groups.items():
            by_cat.setdefault(c, {})[name] = mean_ci(vals, seed=seed)
        if name == "oracle_accuracy":
            metrics["oracle_geneval"] = category_mean_ci(groups, seed=seed)
    # Prompts that place objects by cell (the dense category): exact accuracy on the same prompts,
    # beside the share of their objects found (oracle_objects, averaged over those prompts only).
    placed = [p for p in prompts if p.get("oracle_objects") is not None]
    if placed:
        metrics["oracle_objects_exact"] = mean_ci([p["oracle_accuracy"] for p in placed], seed=seed)
    return metrics, by_cat


def _set_values(set_metrics: dict) -> dict:
    out = {}
    if "clip_distance" in set_metrics:
        out["fd_clip"] = set_metrics["clip_distance"]["fd_clip"]
        out["cmmd"] = set_metrics["clip_distance"]["cmmd"]
    if "fid" in set_metrics:
        out["fid"] = set_metrics["fid"]["fid"]
    return out


def _ident(path: str | None) -> dict | None:
    """A metric model's path and content hash."""
    from .weights import folder_sha256

    if not path:
        return None
    return {"path": str(Path(path).resolve()), "sha256": folder_sha256(path) if Path(path).exists() else None}


def build_report(*, cfg, suite, model: dict, settings, variants: dict, recaption: dict, scheduler,
                 timing: dict, argv: list[str] | None) -> dict:
    out_variants = {}
    records = {r.index: r for r in suite.records}
    for name, res in variants.items():
        prompts = prompt_summaries(res["rows"])
        for p in prompts:
            p["constraints"] = records[p["index"]].constraints
        metrics, by_cat = _aggregate(prompts, cfg.seed)
        out_variants[name] = {"source": res["source"], "skipped": res["skipped"], "generation": res.get("generation", {}),
                              "metrics": metrics,
                              "set_metrics": _set_values(res["set_metrics"]), "set_details": res["set_metrics"],
                              "by_category": by_cat, "prompts": prompts}
    counts: dict[str, int] = {}
    for r in suite.records:
        counts[r.category] = counts.get(r.category, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION, "kind": "t2i-recap eval run",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": {
            "model": model,
            "suite": {"name": suite.name, "source": suite.source, "sha256": suite.hash(),
                      "num_prompts": len(suite.records), "categories": counts, "skipped": suite.skipped},
            "generation": dataclasses.asdict(settings) | {
                "seed_rule": "seed + prompt_index * images_per_prompt + k (same for every prompt form)",
                "scheduler": scheduler},
            "recaption": recaption,
            "metrics": {"oracle_min_confidence": cfg.oracle_min_confidence, "clip": _ident(cfg.clip),
                        "vqa_model": _ident(cfg.vqa_model), "reference": cfg.reference,
                        "inception_weights": _ident(cfg.inception_weights), "fid_antialias": cfg.fid_antialias,
                        "bootstrap": "percentile, 1000 resamples of prompts, 95%"},
            "versions": versions(), "command": argv, "config": dataclasses.asdict(cfg),
        },
        "timing": timing,
        "variants": out_variants,
    }


# ---- Markdown ------------------------------------------------------------------------------

def md_cell(text) -> str:
    """Text from data or prompts in Markdown (a table cell or a line): see `escape.md_text`."""
    return md_text(text)


def fmt_metric(entry) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, dict):
        if entry.get("mean") is None:
            return "-"
        ci = entry.get("ci")
        return f"{entry['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{entry['mean']:.3f}"
    return f"{entry:.3f}"


def metric_columns(reports_variants: list[dict]) -> list[str]:
    names = []
    for v in reports_variants:
        for k in list(v["metrics"]) + list(v["set_metrics"]):
            if k not in names:
                names.append(k)
    order = list(LABELS)
    return sorted(names, key=lambda k: order.index(k) if k in order else len(order))


def worst_key(variant: dict) -> str | None:
    """The per-prompt metric the worst-prompts tables sort by: the oracle's accuracy, else CLIP score."""
    for key in ("oracle_accuracy", "clip_score"):
        if key in variant["metrics"]:
            return key
    return None


# The columns a worst-prompts table shows for the metric it is sorted by.
WORST_COLUMNS = {"oracle_accuracy": ("oracle_accuracy", "oracle_fraction"), "clip_score": ("clip_score",)}


def worst_prompts(variant: dict, n: int) -> list[dict]:
    key = worst_key(variant)
    if key is None:
        return []
    scored = [p for p in variant["prompts"] if p.get(key) is not None]
    return sorted(scored, key=lambda p: (p[key], p.get("oracle_fraction") or 0.0, p["index"]))[:n]


def render_markdown(report: dict) -> str:
    prov = report["provenance"]
    gen = prov["generation"]
    lines = ["# Evaluation report", "",
             f"- model: {md_cell(prov['model']['path'])} (sha256 {prov['model']['sha256'][:16]})",
             f"- suite: {md_cell(prov['suite']['name'])}, {prov['suite']['num_prompts']} prompts "
             f"(sha256 {prov['suite']['sha256'][:16]})",
             f"- generation: {gen['images_per_prompt']} images/prompt, {gen['num_inference_steps']} steps, "
             f"guidance {gen['guidance_scale']}, {gen['resolution']} px, seed {gen['seed']}",
             f"- recaptions: {md_cell(prov['recaption'].get('source'))}", ""]
    variants = report["variants"]
    cols = metric_columns(list(variants.values()))
    rows = [[name] + [fmt_metric(v["metrics"].get(c, v["set_metrics"].get(c))) for c in cols]
            for name, v in variants.items()]
    lines += ["## Metrics (mean [95% CI over prompts])", ""] + md_table(["prompts"] + [LABELS.get(c, c) for c in cols], rows)
    for name, v in variants.items():
        gen = v.get("generation") or {}
        if gen.get("truncated_prompts"):
            lines += ["", f"Text encoder ({name}): {gen['truncated_prompts']} prompts were longer than the model's "
                      f"{gen['max_sequence_length']} tokens and were truncated before generation."]
        clip = v["set_details"].get("clip")
        if clip:
            lines += ["", f"CLIP ({name}): {clip['truncated_prompts']} of {clip['num_prompts']} prompts were longer "
                      f"than the model's {clip['max_text_positions']} text positions and were truncated."]
    cats = list(next(iter(variants.values()))["by_category"]) if variants else []
    if cats:
        key = "oracle_accuracy" if any("oracle_accuracy" in c for v in variants.values() for c in v["by_category"].values()) else "clip_score"
        lines += ["", f"## {LABELS[key]} by category", ""]
        lines += md_table(["category"] + list(variants),
                           [[md_cell(c)] + [fmt_metric(v["by_category"].get(c, {}).get(key)) for v in variants.values()]
                            for c in cats])
    for name, v in variants.items():
        worst = worst_prompts(v, 10)
        if worst:
            cols = WORST_COLUMNS[worst_key(v)]
            lines += ["", f"## Worst prompts ({name}, by {LABELS[worst_key(v)]})", ""]
            lines += md_table(["id", "category", "prompt"] + [LABELS[c] for c in cols],
                               [[md_cell(p["id"]), md_cell(p["category"]), md_cell(p["prompt"])]
                                + [fmt_metric(p.get(c)) for c in cols] for p in worst])
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    out = []
    for name, v in report["variants"].items():
        parts = [f"{LABELS.get(k, k)} {fmt_metric(v['metrics'].get(k, v['set_metrics'].get(k)))}"
                 for k in metric_columns([v])]
        out.append(f"{name}: " + "; ".join(parts))
    return out
