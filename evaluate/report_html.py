"""report.html: one self-contained page (inline CSS, inline SVG charts, images as base64 PNG, no
JavaScript), readable offline and safe to open: every piece of text, prompts above all, goes
through `esc` (markupsafe's escape after making control characters visible). Only `Html`
(markupsafe.Markup) values, built here from escaped parts, are inserted as markup.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from markupsafe import Markup, escape
from PIL import Image

from .metric_oracle import describe_constraint, describe_scene
from .escape import clean_text
from .report import LABELS, LOWER_IS_BETTER, WORST_COLUMNS, fmt_metric, metric_columns, worst_key, worst_prompts

THUMB = 96  # longest side of an embedded image, pixels
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


Html = Markup  # markup assembled from escaped parts; `esc` passes it through unchanged


def esc(value) -> Html:
    if isinstance(value, Markup):
        return value
    return escape(clean_text("" if value is None else value))


def tag(name: str, body="", **attrs) -> Html:
    attr = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Html(f"<{name}{attr}>{esc(body)}</{name}>")


def join(parts) -> Html:
    return Html("".join(esc(p) for p in parts))


def table(headers: list, rows: list[list], cls: str | None = None, num_cols=None) -> Html:
    """`num_cols`: indices of right-aligned number columns (default: all but the first)."""
    num_cols = set(range(1, len(headers))) if num_cols is None else set(num_cols)
    head = tag("tr", join(tag("th", h) for h in headers)) if any(headers) else ""
    body = join(tag("tr", join(tag("td", c, class_="num" if i in num_cols else None) for i, c in enumerate(r)))
                for r in rows)
    return tag("table", join([tag("thead", head), tag("tbody", body)]), class_=cls)


def metric_cell(entry) -> Html:
    """A metric as mean, with its interval on a second, smaller line."""
    if isinstance(entry, dict) and entry.get("mean") is not None and entry.get("ci"):
        lo, hi = entry["ci"]
        return join([f"{entry['mean']:.3f}", Html("<br>"), tag("span", f"[{lo:.3f}, {hi:.3f}]", class_="ci")])
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
    cls = None if oracle is None else ("im ok" if oracle["correct"] else "im bad")
    title = f"seed {image.get('seed')}"
    if oracle is not None:
        title += " | read: " + describe_scene(oracle["scene"])
    path = out_dir / image["image"]
    pic = tag("img", src=img_data_uri(path), alt=f"image {image['k']}", title=title) if path.is_file() else esc("(missing)")
    caption = [f"seed {image.get('seed')}"]
    if show_read and oracle is not None:
        caption.append(tag("div", "read: " + describe_scene(oracle["scene"]), class_="read"))
    return tag("span", join([pic, *caption]), class_=cls or "im")


def bar_chart(categories: list[str], series: dict[str, dict[str, dict]], label: str, suffix: str = " prompts") -> Html:
    """Grouped horizontal bars (one group per category, one bar per series) with CI whiskers."""
    colors = ["#3b6fd4", "#e08a1e", "#2a9d44", "#9b4dca", "#d62839", "#777"]
    values = [e["mean"] for s in series.values() for e in s.values() if e and e.get("mean") is not None]
    top = max([1.0] if label in ("oracle accuracy", "constraints met") else values or [1.0]) or 1.0
    bar_h, gap, left, width = 14, 10, 150, 520
    group_h = bar_h * len(series) + gap
    legend = [f"{name}{suffix}" for name in series]
    # Legend entries flow left to right and wrap; ~7 px per character at 12 px.
    spots, x, y = [], left, 0
    for text in legend:
        w = 14 + 7 * len(text) + 18
        if x + w > left + width and x > left:
            x, y = left, y + 18
        spots.append((x, y))
        x += w
    height = group_h * len(categories) + 30 + y + 18
    parts = []
    for ci, cat in enumerate(categories):
        y0 = 10 + ci * group_h
        parts.append(tag("text", cat, x=str(left - 8), y=str(y0 + group_h / 2), text_anchor="end", font_size="12"))
        for si, (name, data) in enumerate(series.items()):
            entry = data.get(cat) or {}
            if entry.get("mean") is None:
                continue
            y = y0 + si * bar_h
            w = width * max(entry["mean"], 0) / top
            parts.append(tag("rect", x=str(left), y=str(y), width=f"{w:.1f}", height=str(bar_h - 2),
                             fill=colors[si % len(colors)]))
            if entry.get("ci"):
                lo, hi = (left + width * max(v, 0) / top for v in entry["ci"])
                parts.append(tag("line", x1=f"{lo:.1f}", x2=f"{hi:.1f}", y1=str(y + bar_h / 2 - 1),
                                 y2=str(y + bar_h / 2 - 1), stroke="#222", stroke_width="1.5"))
            parts.append(tag("text", f"{entry['mean']:.2f}", x=f"{left + w + 4:.1f}", y=str(y + bar_h - 4), font_size="10"))
    legend_y = 10 + group_h * len(categories) + 16
    for si, (text, (x, dy)) in enumerate(zip(legend, spots)):
        parts.append(tag("rect", x=str(x), y=str(legend_y + dy - 9), width="10", height="10", fill=colors[si % len(colors)]))
        parts.append(tag("text", text, x=str(x + 14), y=str(legend_y + dy), font_size="12"))
    return tag("svg", join(parts), xmlns="http://www.w3.org/2000/svg", width=str(left + width + 60),
               height=str(height), role="img", aria_label=f"{label} by category")


def provenance_table(report: dict) -> Html:
    p = report["provenance"]
    g = p["generation"]
    rows = [["model", f"{p['model']['path']} (sha256 {p['model']['sha256'][:16]})"],
            ["suite", f"{p['suite']['name']}: {p['suite']['num_prompts']} prompts, sha256 {p['suite']['sha256'][:16]}"],
            ["generation", f"{g['images_per_prompt']} images/prompt, {g['num_inference_steps']} steps, guidance "
                           f"{g['guidance_scale']}, {g['resolution']} px, scheduler {g.get('scheduler') or 'as exported'}"],
            ["seeds", f"base {g['seed']}: {g['seed_rule']}"],
            ["recaptions", p["recaption"].get("source")],
            ["versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)],
            ["created", report.get("created")]]
    return table(["", ""], rows, cls="prov", num_cols=())


def metrics_table(variants: dict, label_head: str = "prompts") -> Html:
    cols = metric_columns(list(variants.values()))
    headers = [label_head] + [LABELS.get(c, c) + (" (lower is better)" if c in LOWER_IS_BETTER else "") for c in cols]
    rows = [[name] + [metric_cell(v["metrics"].get(c, v["set_metrics"].get(c))) for c in cols]
            for name, v in variants.items()]
    return table(headers, rows)


def _category_key(variants: dict) -> str:
    for v in variants.values():
        if "oracle_accuracy" in v["metrics"]:
            return "oracle_accuracy"
    return "clip_score" if any("clip_score" in v["metrics"] for v in variants.values()) else ""


def category_grids(report: dict, out_dir: Path, per_category: int) -> Html:
    variants = report["variants"]
    first = next(iter(variants.values()))
    by_index = {name: {p["index"]: p for p in v["prompts"]} for name, v in variants.items()}
    sections = []
    for cat in dict.fromkeys(p["category"] for p in first["prompts"]):
        rows = []
        for p in [p for p in first["prompts"] if p["category"] == cat][:per_category]:
            cells = [tag("div", p["raw_prompt"], class_="prompt")]
            for name in variants:
                q = by_index[name].get(p["index"])
                if q is None:
                    cells.append(esc("(no prompt in this form)"))
                    continue
                text = tag("div", q["prompt"], class_="prompt") if name != "raw" else esc("")
                cells.append(join([text, tag("div", join(image_cell(out_dir, im) for im in q["images"]), class_="imgs")]))
            rows.append(cells)
        sections.append(join([tag("h3", cat), table(["prompt"] + [f"{n} prompts" for n in variants], rows,
                                                     cls="grid", num_cols=())]))
    return join(sections)


def worst_section(report: dict, out_dir: Path, n: int) -> Html:
    """Per prompt form, the worst prompts by the metric `worst_key` picks, with that metric's columns."""
    parts = []
    for name, v in report["variants"].items():
        worst = worst_prompts(v, n)
        if not worst:
            continue
        key = worst_key(v)
        cols = WORST_COLUMNS[key]
        oracle = key == "oracle_accuracy"
        rows = []
        for p in worst:
            expected = join(tag("div", describe_constraint(c)) for c in p.get("constraints", [])) or "-"
            rows.append([join([tag("div", p["prompt"], class_="prompt"), tag("div", p["category"], class_="note")]),
                         expected, *[fmt_metric(p.get(c)) for c in cols],
                         tag("div", join(image_cell(out_dir, im, show_read=oracle) for im in p["images"]), class_="imgs")])
        images_head = "images and what the oracle read" if oracle else "images"
        parts.append(join([tag("h3", f"{name} prompts (by {LABELS[key]})"),
                           table(["prompt", "expected", *[LABELS[c] for c in cols], images_head], rows,
                                 cls="worst", num_cols=range(2, 2 + len(cols)))]))
    return join(parts)


def _oracle_ran(report: dict) -> bool:
    return any("oracle_accuracy" in v["metrics"] for v in report["variants"].values())


def page(title: str, body: Html) -> str:
    head = join([Html('<meta charset="utf-8">'), tag("title", title), tag("style", Html(CSS))])
    return "<!DOCTYPE html>\n" + str(tag("html", join([tag("head", head), tag("body", body)]), lang="en"))


def render_report_html(report: dict, out_dir: Path, per_category: int = 6, worst: int = 12) -> str:
    variants = report["variants"]
    key = _category_key(variants)
    body = [tag("h1", "t2i-recap evaluation"), provenance_table(report),
            tag("h2", "Metrics"), tag("p", "Mean over prompts with a 95% bootstrap interval over prompts; "
                                           "distances are set-level.", class_="note"),
            metrics_table(variants)]
    for name, v in variants.items():
        gen = v.get("generation") or {}
        if gen.get("truncated_prompts"):
            body.append(tag("p", f"Text encoder ({name} prompts): {gen['truncated_prompts']} prompts were longer than "
                                 f"the model's {gen['max_sequence_length']} tokens and were truncated before "
                                 f"generation.", class_="note"))
        clip = v["set_details"].get("clip")
        if clip:
            body.append(tag("p", f"CLIP ({name} prompts): {clip['truncated_prompts']} of {clip['num_prompts']} "
                                 f"prompts exceeded the model's {clip['max_text_positions']} text positions and were "
                                 f"truncated (longest: {clip['max_prompt_tokens']} tokens).", class_="note"))
    if key:
        cats = list(next(iter(variants.values()))["by_category"])
        series = {name: {c: v["by_category"].get(c, {}).get(key) for c in cats} for name, v in variants.items()}
        body += [tag("h2", f"{LABELS[key]} by category"), bar_chart(cats, series, LABELS[key])]
        if "comparison" not in report:
            body.append(table(["category"] + list(variants),
                              [[c] + [metric_cell(series[n][c]) for n in variants] for c in cats]))
    body.append(tag("h2", "Images by category"))
    if _oracle_ran(report):  # the legend speaks only of metrics that ran
        body.append(tag("p", "Green border: the oracle read the image as satisfying every constraint; red: it did "
                             "not. Hover an image for the scene the oracle read.", class_="note"))
    body.append(category_grids(report, out_dir, per_category))
    worst_html = worst_section(report, out_dir, worst)
    if worst_html:
        body += [tag("h2", "Worst failures"), worst_html]
    return page("t2i-recap evaluation report", join(body))
