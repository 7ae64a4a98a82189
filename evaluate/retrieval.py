"""`t2i-recap eval retrieval --model DIR --suite shapes|FILE --out DIR`: zero-shot retrieval and
classification of any CLIPModel folder (the evaluation half of Recap-CLIP).

Three tasks, each a per-item 0/1 score bootstrapped over items (`stats.mean_ci`):
  retrieval        image-to-text and text-to-image R@1/5/10 over (image, caption) pairs;
  long             the same over dense captions of busy images (the Urban-1K analogue: in the shapes
                   world, gold captions of 3-4-object scenes);
  classification   zero-shot accuracy per class set, each class embedded as the mean of its prompt
                   templates (CLIP's prompt ensembling); in the shapes world: shape, colour, colour+shape.
The shapes suite renders scenes drawn from their own seed with the shapes renderer and uses their
gold captions. A FILE suite is JSON: {"retrieval": [{"image": PATH, "text": STR}, ...],
"long": [...] (optional), "classification": {NAME: {"classes": [...], "templates": ["a photo of a {}."],
"items": [{"image": PATH, "label": CLASS}]}} (optional)}, image paths relative to the file.
Writes report.json, report.md and a self-contained report.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.config import ConfigError
from t2i_recap.identity import model_digest
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.markdown import md_table

from .report import fmt_metric, md_cell, versions
from .stats import mean_ci

log = get_logger(__name__)
KIND = "t2i-recap eval retrieval"
KS = (1, 5, 10)
SHAPES_TEMPLATES = ("a {}.", "a picture of a {}.", "there is a {} in the image.")


# ---- suites -------------------------------------------------------------------------------------

def _unique_scenes(rng: random.Random, n: int, min_objects: int, resolution: int, banned=()) -> list:
    """`n` scenes whose rendered images differ from each other and from `banned`'s: two scenes that
    render alike at a small resolution would make a caption's own image impossible to single out."""
    from t2i_recap.shapes.render import render
    from t2i_recap.shapes.world import sample_scene

    seen = {render(s, resolution).tobytes() for s in banned}
    out = []
    while len(out) < n:
        s = sample_scene(rng, min_objects=min_objects)
        pixels = render(s, resolution).tobytes()
        if pixels not in seen:
            seen.add(pixels)
            out.append(s)
    return out


def _pairs(scenes, rng: random.Random, resolution: int, prefix: str) -> list[dict]:
    from t2i_recap.shapes.render import render
    from t2i_recap.shapes.scene_batches import gold_captions

    return [{"id": f"{prefix}-{i:04d}", "image": render(s, resolution), "text": t}
            for i, (s, t) in enumerate(zip(scenes, gold_captions(scenes, rng)))]


def _shapes_classification(rng: random.Random, per_class: int, resolution: int) -> dict:
    from t2i_recap.shapes.render import render
    from t2i_recap.shapes.world import COLORS, SHAPES, Obj, Scene

    def one(shape, color):  # large: a small shape at a few pixels can render like another shape
        return render(Scene((Obj(rng.randrange(3), rng.randrange(3), shape, color, "large"),)), resolution)

    sets = {"shape": [(s, None, s) for s in SHAPES], "colour": [(None, c, f"{c} object") for c in COLORS],
            "colour+shape": [(s, c, f"{c} {s}") for c, s in itertools.product(COLORS, SHAPES)]}
    out = {}
    for name, classes in sets.items():
        items = []
        for shape, color, label in classes:
            for _ in range(per_class):
                items.append({"image": one(shape or rng.choice(SHAPES), color or rng.choice(list(COLORS))),
                              "label": label})
        out[name] = {"classes": [c[2] for c in classes], "templates": list(SHAPES_TEMPLATES), "items": items}
    return out


def shapes_suite(n: int = 100, n_long: int = 100, per_class: int = 10, resolution: int = 32, seed: int = 1234) -> dict:
    """Scenes from their own seed (apart from any training stream), rendered, with their gold captions."""
    rng = random.Random(f"retrieval-suite-{seed}")
    scenes = _unique_scenes(rng, n, 1, resolution)
    long_scenes = _unique_scenes(rng, n_long, 3, resolution, banned=scenes)
    return {"name": "shapes", "params": {"n": n, "n_long": n_long, "per_class": per_class,
                                         "resolution": resolution, "seed": seed},
            "retrieval": _pairs(scenes, rng, resolution, "pair"), "long": _pairs(long_scenes, rng, resolution, "long"),
            "classification": _shapes_classification(rng, per_class, resolution)}


def _open_image(base: Path, rel: str, where: str) -> Image.Image:
    path = base / rel
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: image {rel!r} does not open ({exc})") from None


def file_suite(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"suite {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("retrieval"), list) or not data["retrieval"]:
        raise ValueError(f"suite {path}: needs a non-empty \"retrieval\" list of {{image, text}}")
    base = path.parent

    def pairs(key):
        out = []
        for i, item in enumerate(data.get(key) or []):
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or "image" not in item:
                raise ValueError(f"suite {path}: {key}[{i}] needs \"image\" and a string \"text\"")
            out.append({"id": f"{key}-{i:04d}", "image": _open_image(base, item["image"], f"{path} {key}[{i}]"),
                        "text": item["text"]})
        return out

    classification = {}
    for name, spec in (data.get("classification") or {}).items():
        classes, templates = spec.get("classes") or [], spec.get("templates") or ["a photo of a {}."]
        items = []
        for i, item in enumerate(spec.get("items") or []):
            if item.get("label") not in classes:
                raise ValueError(f"suite {path}: classification.{name}.items[{i}] label {item.get('label')!r} "
                                 f"is not one of its classes")
            items.append({"image": _open_image(base, item["image"], f"{path} {name}[{i}]"), "label": item["label"]})
        classification[name] = {"classes": classes, "templates": templates, "items": items}
    return {"name": path.name, "params": {"file": str(path)}, "retrieval": pairs("retrieval"),
            "long": pairs("long"), "classification": classification}


def suite_digest(suite: dict) -> str:
    """Identity of a suite by content: its texts, labels and image pixels."""
    h = hashlib.sha256()
    for key in ("retrieval", "long"):
        for item in suite[key]:
            h.update(item["text"].encode("utf-8"))
            h.update(item["image"].tobytes())
    for name, spec in sorted(suite["classification"].items()):
        h.update(json.dumps([name, spec["classes"], spec["templates"]]).encode("utf-8"))
        for item in spec["items"]:
            h.update(item["label"].encode("utf-8"))
            h.update(item["image"].tobytes())
    return h.hexdigest()


# ---- scoring ------------------------------------------------------------------------------------

class ClipScorer:
    """Normalised image and text embeddings from a CLIPModel folder, through its own processor."""

    def __init__(self, model_dir: str | Path, batch_size: int = 64, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(model_dir)).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(model_dir))
        self.batch_size, self.device = batch_size, device
        self.max_length = self.model.config.text_config.max_position_embeddings

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers v5 returns a model output from get_*_features; v4 returned the tensor itself.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=images[i:i + self.batch_size], return_tensors="pt").pixel_values
            feats.append(self._features(self.model.get_image_features(pixel_values=px.to(self.device))))
        return torch.nn.functional.normalize(torch.cat(feats).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                           max_length=self.max_length, return_tensors="pt").to(self.device)
            feats.append(self._features(self.model.get_text_features(input_ids=tok.input_ids,
                                                                     attention_mask=tok.attention_mask)))
        return torch.nn.functional.normalize(torch.cat(feats).float(), dim=-1).cpu()


def recall_hits(sims: torch.Tensor, ks=KS) -> dict[str, list[float]]:
    """Per query (row) whether its own item (the diagonal) ranks within the top k; ties count against it."""
    own = sims.diagonal().unsqueeze(1)
    rank = (sims >= own).sum(dim=1) - 1  # other items scoring at least as high as the right one
    return {f"r{k}": [float(r < k) for r in rank.tolist()] for k in ks}


def score_retrieval(scorer, pairs: list[dict], seed: int) -> tuple[dict, dict]:
    img, txt = scorer.images([p["image"] for p in pairs]), scorer.texts([p["text"] for p in pairs])
    sims = img @ txt.T  # (images, texts)
    i2t, t2i = recall_hits(sims), recall_hits(sims.T)
    metrics = {f"{d}_{k}": mean_ci(v, seed=seed) for d, hits in (("i2t", i2t), ("t2i", t2i)) for k, v in hits.items()}
    per_item = {"i2t_r1": i2t["r1"], "t2i_r1": t2i["r1"]}
    return metrics, per_item


def score_classification(scorer, spec: dict, seed: int) -> dict:
    classes = spec["classes"]
    emb = torch.stack([scorer.texts([t.format(c) for t in spec["templates"]]).mean(0) for c in classes])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    pred = (scorer.images([it["image"] for it in spec["items"]]) @ emb.T).argmax(dim=1)
    correct = [float(classes[int(p)] == it["label"]) for p, it in zip(pred, spec["items"])]
    return {**mean_ci(correct, seed=seed), "classes": len(classes), "chance": 1 / len(classes)}


def evaluate(model_dir: str | Path, suite: dict, seed: int = 0, batch_size: int = 64) -> dict:
    """Score the CLIPModel folder `model_dir` on `suite`: the report as a dict."""
    model = {"path": str(model_dir), "sha256": model_digest(model_dir)}
    return evaluate_scorer(ClipScorer(model_dir, batch_size), suite, model, seed)


def evaluate_scorer(scorer, suite: dict, model: dict, seed: int = 0) -> dict:
    """Score any object with `images(list) -> (N, D)` and `texts(list) -> (N, D)` unit embeddings."""
    retrieval, per_item = score_retrieval(scorer, suite["retrieval"], seed)
    report = {"kind": KIND, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "model": model,
              "suite": {"name": suite["name"], "params": suite["params"], "sha256": suite_digest(suite)},
              "metrics": {"retrieval": retrieval, "chance_r1": 1 / len(suite["retrieval"])},
              "items": [{"id": p["id"], "text": p["text"], "i2t_r1": a, "t2i_r1": b}
                        for p, a, b in zip(suite["retrieval"], per_item["i2t_r1"], per_item["t2i_r1"])],
              "versions": versions()}
    if suite["long"]:
        report["metrics"]["long"], _ = score_retrieval(scorer, suite["long"], seed)
    report["metrics"]["classification"] = {name: score_classification(scorer, spec, seed)
                                           for name, spec in suite["classification"].items()}
    return report


# ---- reports ------------------------------------------------------------------------------------

def metric_rows(report: dict) -> list[tuple[str, dict]]:
    m = report["metrics"]
    rows = [(f"{task}: {k.replace('_r', ' R@')}", v) for task in ("retrieval", "long") for k, v in m.get(task, {}).items()]
    rows += [(f"classification: {name}", v) for name, v in m["classification"].items()]
    return rows


def render_markdown(report: dict) -> str:
    lines = ["# CLIP retrieval evaluation", "", f"Model: {md_cell(report['model']['path'])} "
             f"(sha256 {report['model']['sha256'][:12]}); suite: {md_cell(report['suite']['name'])}.", "",
             "Mean [95% bootstrap CI over items].", ""]
    lines += md_table(["metric", "value"], [[md_cell(name), fmt_metric(v)] for name, v in metric_rows(report)])
    missed = [it for it in report["items"] if not it["t2i_r1"]][:10]
    if missed:
        lines += ["", "## Captions whose image was not ranked first", ""] + [f"- {md_cell(it['text'])}" for it in missed]
    return "\n".join(lines) + "\n"


def render_html(report: dict) -> str:
    from .report_html import join, page, table, tag

    rows = [[name, fmt_metric(v)] for name, v in metric_rows(report)]
    missed = [it for it in report["items"] if not it["t2i_r1"]][:10]
    body = [tag("h1", "CLIP retrieval evaluation"),
            tag("p", f"Model {report['model']['path']} (sha256 {report['model']['sha256'][:12]}), "
                     f"suite {report['suite']['name']}."),
            table(["metric", "mean [95% CI]"], rows)]
    if missed:
        body += [tag("h2", "Captions whose image was not ranked first"), tag("ul", join(tag("li", it["text"]) for it in missed))]
    return page("CLIP retrieval evaluation", join(body))


def write_reports(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.html", render_html(report))


# ---- compare ------------------------------------------------------------------------------------

def is_retrieval_report(path: str | Path) -> bool:
    path = Path(path)
    f = path / "report.json" if path.is_dir() else path
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def compare_runs(runs: list[str | Path], labels: list[str] | None = None) -> dict:
    """CLIP runs side by side: one row per run, one column per metric."""
    reports = []
    for r in runs:
        path = Path(r)
        reports.append(json.loads((path / "report.json" if path.is_dir() else path).read_text(encoding="utf-8")))
    if any(rep.get("kind") != KIND for rep in reports):
        raise ValueError("eval compare: mix of CLIP retrieval reports and other reports; compare like with like")
    if labels and len(labels) != len(reports):
        raise ValueError(f"--labels has {len(labels)} names for {len(reports)} runs")
    suites = {rep["suite"]["sha256"] for rep in reports}
    rows = [{"label": labels[i] if labels else Path(runs[i]).name, "model_sha256": rep["model"]["sha256"],
             "metrics": dict(metric_rows(rep))} for i, rep in enumerate(reports)]
    return {"kind": "t2i-recap eval compare (retrieval)", "same_suite": len(suites) == 1, "rows": rows}


def compare_markdown(result: dict) -> str:
    cols = list(dict.fromkeys(k for row in result["rows"] for k in row["metrics"]))
    lines = ["# CLIP comparison", ""] + md_table(
        ["run", *(md_cell(c) for c in cols)],
        [[md_cell(r["label"]), *(fmt_metric(r["metrics"].get(c)) for c in cols)] for r in result["rows"]])
    if not result["same_suite"]:
        lines += ["", "Warning: the runs used different suites."]
    return "\n".join(lines) + "\n"


def compare_html(result: dict) -> str:
    from .report_html import join, page, table, tag

    cols = list(dict.fromkeys(k for row in result["rows"] for k in row["metrics"]))
    rows = [[r["label"], *[fmt_metric(r["metrics"].get(c)) for c in cols]] for r in result["rows"]]
    return page("CLIP comparison", join([tag("h1", "CLIP comparison"), table(["run", *cols], rows)]))


def write_compare(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=1))
    atomic_write_text(out / "compare.md", compare_markdown(result))
    atomic_write_text(out / "compare.html", compare_html(result))


def compare_main(runs: list[str], labels: list[str] | None, out: Path) -> int:
    """`t2i-recap eval compare` for CLIP retrieval reports."""
    try:
        result = compare_runs(runs, labels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"t2i-recap eval compare: error: {exc}", file=sys.stderr)
        return 2
    write_compare(result, out)
    print(compare_markdown(result))
    return 0


# ---- CLI ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class RetrievalConfig:
    """What `t2i-recap eval retrieval` scores (its flags, or --config / --set)."""

    model: str = ""
    """A CLIPModel folder (config.json, weights, processor files)."""
    suite: str = "shapes"
    """"shapes" or a JSON suite file."""
    out: str = ""
    """Folder for report.json/.md/.html."""
    resolution: int = 32
    """Shapes suite: rendered image side."""
    n: int = 100
    """Shapes suite: pairs for retrieval and for long captions."""
    seed: int = 0
    """Bootstrap seed."""


FLAGS = {"--model": "model", "--suite": "suite", "--out": "out", "--resolution": "resolution", "--n": "n",
         "--seed": "seed"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-recap eval retrieval", description=__doc__.split("\n\n")[0])
    add_config_arguments(ap, RetrievalConfig, FLAGS, required=("--model", "--out"))
    return ap


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ap = build_parser()
    try:
        args = config_from_args(RetrievalConfig, ap.parse_args(argv))
    except ConfigError as exc:
        ap.error(str(exc))
    try:
        suite = (shapes_suite(args.n, args.n, resolution=args.resolution) if args.suite == "shapes"
                 else file_suite(args.suite))
        report = evaluate(args.model, suite, seed=args.seed)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"t2i-recap eval retrieval: error: {exc}", file=sys.stderr)
        return 2
    write_reports(report, Path(args.out))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
