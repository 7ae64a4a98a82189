"""report.html: one self-contained page (inline CSS, inline SVG charts, images as base64 PNG, no
JavaScript), readable offline and safe to open. The markup lives in the Jinja2 templates below,
rendered with autoescape on, so every piece of text, prompts above all, is escaped (after
`clean_text` makes control characters visible); only `Markup` values that the templates' own
macros made are inserted as markup. Python here computes the page's data: rows, chart geometry,
image thumbnails.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup, escape
from PIL import Image

from t2i_recap.markdown import clean_text

from .metric_oracle import describe_constraint, describe_scene
from .report import LABELS, LOWER_IS_BETTER, WORST_COLUMNS, fmt_metric, metric_columns, worst_key, worst_prompts

THUMB = 96  # longest side of an embedded image, pixels
COLORS = ["#3b6fd4", "#e08a1e", "#2a9d44", "#9b4dca", "#d62839", "#777"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1200px}
h1{font-size:26px}h2{font-size:20px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f5}
.ci{color:#666;font-size:11px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.prov td:first-child{font-weight:600;white-space:nowrap}
.grid{table-layout:fixed;width:100%}
.worst{width:100%}.worst td:first-child{width:26%}.worst td:nth-child(2){width:16%}
.imgs{display:flex;flex-wrap:wrap;gap:4px}
.im{display:inline-block;text-align:center;font-size:11px}
.im img{width:72px;height:72px;image-rendering:pixelated;border:3px solid #bbb;display:block}
.ok img{border-color:#2a9d44}.bad img{border-color:#d62839}
.read{width:150px;text-align:left;color:#444;white-space:normal}
.prompt{font-family:ui-monospace,Menlo,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word}
.note{color:#555;font-size:12px}
"""


TEMPLATES = {
    "macros.html": """
{%- macro table(headers, rows, cls=none, num_cols=()) -%}
<table{% if cls %} class="{{ cls }}"{% endif %}><thead>
{%- if headers | select | list %}<tr>{% for h in headers %}<th>{{ h }}</th>{% endfor %}</tr>{% endif -%}
</thead><tbody>
{%- for row in rows %}<tr>{% for cell in row %}<td{% if loop.index0 in num_cols %} class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>{% endfor -%}
</tbody></table>
{%- endmacro %}

{%- macro metric_cell(mean, lo, hi) -%}
{{ "%.3f" | format(mean) }}<br><span class="ci">[{{ "%.3f" | format(lo) }}, {{ "%.3f" | format(hi) }}]</span>
{%- endmacro %}

{%- macro div(text, cls=none) -%}
<div{% if cls %} class="{{ cls }}"{% endif %}>{{ text }}</div>
{%- endmacro %}

{%- macro image_cell(im, show_read=false) -%}
<span class="{{ im.cls }}">
{%- if im.src %}<img src="{{ im.src }}" alt="{{ im.alt }}" title="{{ im.title }}">{% else %}(missing){% endif -%}
seed {{ im.seed }}
{%- if show_read and im.read is not none %}<div class="read">read: {{ im.read }}</div>{% endif -%}
</span>
{%- endmacro %}

{%- macro images(cells) -%}
<div class="imgs">{% for cell in cells %}{{ cell }}{% endfor %}</div>
{%- endmacro %}

{%- macro bar_chart(c) -%}
<svg xmlns="http://www.w3.org/2000/svg" width="{{ c.width }}" height="{{ c.height }}" role="img" aria-label="{{ c.label }} by category">
{%- for g in c.groups %}<text x="{{ c.left - 8 }}" y="{{ g.y }}" text-anchor="end" font-size="12">{{ g.name }}</text>
{%- for b in g.bars %}<rect x="{{ c.left }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ c.bar_h - 2 }}" fill="{{ b.color }}"></rect>
{%- if b.ci %}<line x1="{{ b.ci[0] }}" x2="{{ b.ci[1] }}" y1="{{ b.mid }}" y2="{{ b.mid }}" stroke="#222" stroke-width="1.5"></line>{% endif -%}
<text x="{{ b.text_x }}" y="{{ b.text_y }}" font-size="10">{{ b.value }}</text>
{%- endfor %}{% endfor %}
{%- for item in c.legend %}<rect x="{{ item.x }}" y="{{ item.y - 9 }}" width="10" height="10" fill="{{ item.color }}"></rect><text x="{{ item.x + 14 }}" y="{{ item.y }}" font-size="12">{{ item.text }}</text>{% endfor -%}
</svg>
{%- endmacro %}
""",
    "page.html": """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css }}</style></head><body>
{%- block body %}{{ body }}{% endblock -%}
</body></html>""",
    "report.html": """{% extends "page.html" %}{% import "macros.html" as m %}
{%- block body -%}
<h1>t2i-recap evaluation</h1>
{{- m.table(["", ""], provenance, "prov") -}}
<h2>Metrics</h2><p class="note">Mean over prompts with a 95% bootstrap interval over prompts; distances are set-level.</p>
{{- m.table(metrics.headers, metrics.rows, none, metrics.num_cols) -}}
{%- for note in notes %}<p class="note">{{ note }}</p>{% endfor -%}
{%- if chart -%}
<h2>{{ chart.title }}</h2>{{ chart.svg }}
{%- if category_table %}{{ m.table(category_table.headers, category_table.rows, none, category_table.num_cols) }}{% endif -%}
{%- endif -%}
<h2>Images by category</h2>
{%- if oracle_ran %}<p class="note">Green border: the oracle read the image as satisfying every constraint; red: it did not. Hover an image for the scene the oracle read.</p>{% endif -%}
{%- for section in grids %}<h3>{{ section.name }}</h3>{{ m.table(section.headers, section.rows, "grid") }}{% endfor -%}
{%- if worst -%}
<h2>Worst failures</h2>
{%- for w in worst %}<h3>{{ w.title }}</h3>{{ m.table(w.headers, w.rows, "worst", w.num_cols) }}{% endfor -%}
{%- endif -%}
{%- endblock %}""",
    "compare.html": """{% extends "page.html" %}{% import "macros.html" as m %}
{%- block body -%}
<h1>t2i-recap comparison</h1><p class="note">Rows: runs (labelled by the caption-mixing p when the export records it). Mean with a 95% bootstrap interval over prompts; FD-CLIP, CMMD and FID are set-level (lower is better).</p>
{#- Table 7's layout: one column group per prompt form -#}
<table><thead><tr><th rowspan="2">run</th>{% for g in groups %}<th colspan="{{ g.span }}">{{ g.name }} prompts</th>{% endfor %}</tr>
{#- #}<tr>{% for name in column_names %}<th>{{ name }}</th>{% endfor %}</tr></thead><tbody>
{%- for row in rows %}<tr><td>{{ row.label }}</td>{% for cell in row.cells %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor -%}
</tbody></table>
{%- if not same_suite %}<p class="note">Warning: the runs used different prompt suites.</p>{% endif -%}
{%- for chart in charts %}<h2>{{ chart.title }}</h2>{{ chart.svg }}{% endfor -%}
<h2>Runs</h2>{{ m.table(["run", "folder", "model sha256"], runs) }}
{%- endblock %}""",
}


def _finalize(value):
    """Every `{{ }}` value: None shows as nothing, text gets control characters made visible
    (autoescape then escapes it); markup made by the macros passes as it is."""
    if value is None:
        return ""
    return value if isinstance(value, Markup) else clean_text(value)


ENV = Environment(loader=DictLoader(TEMPLATES), autoescape=True, finalize=_finalize, undefined=StrictUndefined,
                  keep_trailing_newline=False)
MACROS = ENV.get_template("macros.html").module


# ---- the small pieces other pages reuse ---------------------------------------------------------

Html = Markup  # markup made by the templates (or escaped by `esc`); passes through autoescape unchanged


def esc(value) -> Html:
    """Text as escaped markup (control characters made visible first); markup passes unchanged."""
    if isinstance(value, Markup):
        return value
    return escape(clean_text("" if value is None else value))


def tag(name: str, body="", **attrs) -> Html:
    """One element with escaped body and attributes, for the small pages without a template yet
    (evaluate/retrieval.py); the report and comparison pages use the templates."""
    attr = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Html(f"<{name}{attr}>{esc(body)}</{name}>")


def join(parts) -> Html:
    return Html("").join(esc(p) for p in parts)


def table(headers: list, rows: list[list], cls: str | None = None, num_cols=None) -> Html:
    """`num_cols`: indices of right-aligned number columns (default: all but the first)."""
    num_cols = range(1, len(headers)) if num_cols is None else num_cols
    return MACROS.table(headers, rows, cls, sorted(num_cols))


def page(title: str, body: Html) -> str:
    return render("page.html", title=title, body=body)


def render(template: str, **context) -> str:
    """A whole page from one of TEMPLATES (the page's CSS filled in)."""
    return ENV.get_template(template).render(css=Markup(CSS), **context)


def metric_cell(entry) -> Html:
    """A metric as mean, with its interval on a second, smaller line."""
    if isinstance(entry, dict) and entry.get("mean") is not None and entry.get("ci"):
        return MACROS.metric_cell(entry["mean"], *entry["ci"])
    return esc(fmt_metric(entry))


def img_data_uri(path: Path) -> str:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if max(img.size) > THUMB:
            img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_cell(out_dir: Path, image: dict, show_read: bool = False) -> Html:
    oracle = image.get("oracle")
    path = out_dir / image["image"]
    title = f"seed {image.get('seed')}"
    if oracle is not None:
        title += " | read: " + describe_scene(oracle["scene"])
    cell = {"cls": "im" if oracle is None else ("im ok" if oracle["correct"] else "im bad"),
            "src": img_data_uri(path) if path.is_file() else None, "alt": f"image {image['k']}", "title": title,
            "seed": image.get("seed"), "read": None if oracle is None else describe_scene(oracle["scene"])}
    return MACROS.image_cell(cell, show_read)


def bar_chart(categories: list[str], series: dict[str, dict[str, dict]], label: str, suffix: str = " prompts") -> Html:
    """Grouped horizontal bars (one group per category, one bar per series) with CI whiskers."""
    values = [e["mean"] for s in series.values() for e in s.values() if e and e.get("mean") is not None]
    top = max([1.0] if label in ("oracle accuracy", "constraints met") else values or [1.0]) or 1.0
    bar_h, gap, left, width = 14, 10, 150, 520
    group_h = bar_h * len(series) + gap
    legend = [f"{name}{suffix}" for name in series]
    # Legend entries flow left to right and wrap; ~7 px per character at 12 px.
    spots, x, dy = [], left, 0
    for text in legend:
        w = 14 + 7 * len(text) + 18
        if x + w > left + width and x > left:
            x, dy = left, dy + 18
        spots.append((x, dy))
        x += w
    height = group_h * len(categories) + 30 + dy + 18
    groups = []
    for ci, cat in enumerate(categories):
        y0 = 10 + ci * group_h
        bars = []
        for si, data in enumerate(series.values()):
            entry = data.get(cat) or {}
            if entry.get("mean") is None:
                continue
            y = y0 + si * bar_h
            w = width * max(entry["mean"], 0) / top
            whisker = [f"{left + width * max(v, 0) / top:.1f}" for v in entry["ci"]] if entry.get("ci") else None
            bars.append({"y": y, "w": f"{w:.1f}", "color": COLORS[si % len(COLORS)], "ci": whisker,
                         "mid": str(y + bar_h / 2 - 1), "text_x": f"{left + w + 4:.1f}", "text_y": y + bar_h - 4,
                         "value": f"{entry['mean']:.2f}"})
        groups.append({"name": cat, "y": str(y0 + group_h / 2), "bars": bars})
    legend_y = 10 + group_h * len(categories) + 16
    chart = {"label": label, "left": left, "bar_h": bar_h, "width": left + width + 60,
             "height": height, "groups": groups,
             "legend": [{"x": lx, "y": legend_y + dy, "text": text, "color": COLORS[si % len(COLORS)]}
                        for si, (text, (lx, dy)) in enumerate(zip(legend, spots))]}
    return MACROS.bar_chart(chart)


# ---- the evaluation report ----------------------------------------------------------------------

def provenance_rows(report: dict) -> list[list]:
    p = report["provenance"]
    g = p["generation"]
    return [["model", f"{p['model']['path']} (sha256 {p['model']['sha256'][:16]})"],
            ["suite", f"{p['suite']['name']}: {p['suite']['num_prompts']} prompts, sha256 {p['suite']['sha256'][:16]}"],
            ["generation", f"{g['images_per_prompt']} images/prompt, {g['num_inference_steps']} steps, guidance "
                           f"{g['guidance_scale']}, {g['resolution']} px, scheduler {g.get('scheduler') or 'as exported'}"],
            ["seeds", f"base {g['seed']}: {g['seed_rule']}"],
            ["recaptions", p["recaption"].get("source")],
            ["versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)],
            ["created", report.get("created")]]


def metrics_table(variants: dict, label_head: str = "prompts") -> dict:
    cols = metric_columns(list(variants.values()))
    headers = [label_head] + [LABELS.get(c, c) + (" (lower is better)" if c in LOWER_IS_BETTER else "") for c in cols]
    rows = [[name] + [metric_cell(v["metrics"].get(c, v["set_metrics"].get(c))) for c in cols]
            for name, v in variants.items()]
    return {"headers": headers, "rows": rows, "num_cols": list(range(1, len(headers)))}


def _notes(variants: dict) -> list[str]:
    notes = []
    for name, v in variants.items():
        gen = v.get("generation") or {}
        if gen.get("truncated_prompts"):
            notes.append(f"Text encoder ({name} prompts): {gen['truncated_prompts']} prompts were longer than "
                         f"the model's {gen['max_sequence_length']} tokens and were truncated before generation.")
        clip = v["set_details"].get("clip")
        if clip:
            notes.append(f"CLIP ({name} prompts): {clip['truncated_prompts']} of {clip['num_prompts']} prompts "
                         f"exceeded the model's {clip['max_text_positions']} text positions and were truncated "
                         f"(longest: {clip['max_prompt_tokens']} tokens).")
    return notes


def _category_key(variants: dict) -> str:
    for v in variants.values():
        if "oracle_accuracy" in v["metrics"]:
            return "oracle_accuracy"
    return "clip_score" if any("clip_score" in v["metrics"] for v in variants.values()) else ""


def category_grids(report: dict, out_dir: Path, per_category: int) -> list[dict]:
    variants = report["variants"]
    first = next(iter(variants.values()))
    by_index = {name: {p["index"]: p for p in v["prompts"]} for name, v in variants.items()}
    sections = []
    for cat in dict.fromkeys(p["category"] for p in first["prompts"]):
        rows = []
        for p in [p for p in first["prompts"] if p["category"] == cat][:per_category]:
            cells = [MACROS.div(p["raw_prompt"], "prompt")]
            for name in variants:
                q = by_index[name].get(p["index"])
                if q is None:
                    cells.append("(no prompt in this form)")
                    continue
                text = MACROS.div(q["prompt"], "prompt") if name != "raw" else Markup("")
                cells.append(text + MACROS.images([image_cell(out_dir, im) for im in q["images"]]))
            rows.append(cells)
        sections.append({"name": cat, "headers": ["prompt"] + [f"{n} prompts" for n in variants], "rows": rows})
    return sections


def worst_tables(report: dict, out_dir: Path, n: int) -> list[dict]:
    """Per prompt form, the worst prompts by the metric `worst_key` picks, with that metric's columns."""
    tables = []
    for name, v in report["variants"].items():
        worst = worst_prompts(v, n)
        if not worst:
            continue
        key = worst_key(v)
        cols = WORST_COLUMNS[key]
        oracle = key == "oracle_accuracy"
        rows = []
        for p in worst:
            expected = Markup("").join(MACROS.div(describe_constraint(c)) for c in p.get("constraints", [])) or "-"
            rows.append([MACROS.div(p["prompt"], "prompt") + MACROS.div(p["category"], "note"), expected,
                         *[fmt_metric(p.get(c)) for c in cols],
                         MACROS.images([image_cell(out_dir, im, show_read=oracle) for im in p["images"]])])
        images_head = "images and what the oracle read" if oracle else "images"
        tables.append({"title": f"{name} prompts (by {LABELS[key]})", "rows": rows,
                       "headers": ["prompt", "expected", *[LABELS[c] for c in cols], images_head],
                       "num_cols": list(range(2, 2 + len(cols)))})
    return tables


def _oracle_ran(report: dict) -> bool:
    return any("oracle_accuracy" in v["metrics"] for v in report["variants"].values())


def render_report_html(report: dict, out_dir: Path, per_category: int = 6, worst: int = 12) -> str:
    variants = report["variants"]
    key = _category_key(variants)
    chart = category_table = None
    if key:
        cats = list(next(iter(variants.values()))["by_category"])
        series = {name: {c: v["by_category"].get(c, {}).get(key) for c in cats} for name, v in variants.items()}
        chart = bar_chart(cats, series, LABELS[key])
        chart = {"title": f"{LABELS[key]} by category", "svg": chart}
        if "comparison" not in report:
            category_table = {"headers": ["category"] + list(variants), "num_cols": list(range(1, len(variants) + 1)),
                              "rows": [[c] + [metric_cell(series[n][c]) for n in variants] for c in cats]}
    return render(
        "report.html", title="t2i-recap evaluation report", provenance=provenance_rows(report),
        metrics=metrics_table(variants), notes=_notes(variants), chart=chart, category_table=category_table,
        oracle_ran=_oracle_ran(report), grids=category_grids(report, out_dir, per_category),
        worst=worst_tables(report, out_dir, worst))
