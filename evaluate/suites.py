"""Prompt suites: the built-in `shapes` suite and user prompt files.

The `shapes` suite follows GenEval's categories (single object, two objects, counting, colours,
position, colour attribution; docs/references.md section 5) on the shapes world, plus `dense` prompts
with 3-4 objects, sizes and positions (DPG-Bench's role). Every prompt carries its target as
constraints (checked exactly by `metric_oracle.check_constraints` on the scene the oracle reads
back) and a gold scene that satisfies them, so "render the gold scene, score it" must give 100%.

User files (txt, jsonl/json incl. COCO caption annotations, csv, parquet) give prompts without
constraints unless they have `constraints` / `scene` columns; the oracle then skips them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable

from t2i_recap.shapes.captions import GOLD_TEMPLATES, NUMBER_WORDS, gold_caption
from t2i_recap.shapes.world import COLORS, SHAPES, SIZES, Obj, Scene, relation, sample_scene

CATEGORIES: tuple[str, ...] = (
    "single_object", "two_objects", "counting", "colors", "position", "color_attr", "dense",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

# Column names accepted in user prompt files, in order of preference. Recap-DataComp-1B's
# `org_caption` / `re_caption` pair maps to the raw and recaptioned forms.
PROMPT_COLUMNS = ("prompt", "caption", "text", "org_caption")
RECAPTION_COLUMNS = ("recaption", "re_caption")
ID_COLUMNS = ("id", "key", "image_id", "uid")
IMAGE_COLUMNS = ("image", "image_path", "file_name")


@dataclasses.dataclass
class PromptRecord:
    """One prompt of a suite; `index` fixes its seeds and image file names, never its id."""

    index: int
    id: str
    category: str
    prompt: str
    constraints: list[dict] = dataclasses.field(default_factory=list)
    scene: dict | None = None
    recaption: str | None = None
    image: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def gold_scene(self) -> Scene | None:
        return Scene.from_dict(self.scene) if self.scene else None


@dataclasses.dataclass
class Suite:
    name: str
    records: list[PromptRecord]
    source: str
    skipped: list[dict] = dataclasses.field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            seen.setdefault(r.category, None)
        return list(seen)

    def hash(self) -> str:
        return suite_hash(self.records)


def suite_hash(records: list[PromptRecord]) -> str:
    """sha256 over the canonical JSON of every record: the prompt set's identity in reports."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=True).encode() + b"\n")
    return h.hexdigest()


# ---- constraints (plain dicts, so they live in JSON/CSV/parquet suite files) -------------------

def count_c(shape: str, n: int, *, color: str | None = None, size: str | None = None,
            exact: bool = False) -> dict:
    """`n` objects (exactly, or at least) of this shape and, when given, colour and size."""
    return {"type": "count", "shape": shape, "color": color, "size": size, "n": n, "exact": exact}


def relation_c(a: dict, rel: str, b: dict) -> dict:
    """Some object matching `a` stands `rel` some other object matching `b`."""
    return {"type": "relation", "a": a, "rel": rel, "b": b}


def cell_c(obj: Obj) -> dict:
    """The object at this grid cell has this shape, colour and size."""
    return {"type": "cell", "row": obj.row, "col": obj.col, "shape": obj.shape, "color": obj.color,
            "size": obj.size}


def total_c(n: int) -> dict:
    return {"type": "total", "n": n}


# ---- the shapes suite ------------------------------------------------------------------------

def _desc(shape: str, color: str | None = None, size: str | None = None) -> str:
    return " ".join(w for w in (size, color, shape) if w)


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _free_cells(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return rng.sample([(r, c) for r in range(3) for c in range(3)], n)


def _obj(cell, shape, color=None, size=None, rng=None) -> Obj:
    return Obj(cell[0], cell[1], shape, color or rng.choice(list(COLORS)), size or rng.choice(SIZES))


def _single(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    size, shape = item
    scene = Scene((_obj(_free_cells(rng, 1)[0], shape, size=size, rng=rng),))
    return f"a picture of {_article(_desc(shape, size=size))}", [count_c(shape, 1, size=size)], scene


def _pair(rng: random.Random, a: dict, b: dict) -> tuple[str, list[dict], Scene]:
    """Two objects in free cells; `a` and `b` fix shape plus colour or size, the rest is random."""
    ca, cb = _free_cells(rng, 2)
    scene = Scene((_obj(ca, rng=rng, **a), _obj(cb, rng=rng, **b)))
    text = f"a picture of {_article(_desc(**a))} and {_article(_desc(**b))}"
    return text, [count_c(n=1, **a), count_c(n=1, **b)], scene


def _two(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    (z1, s1), (z2, s2) = item
    return _pair(rng, {"shape": s1, "size": z1}, {"shape": s2, "size": z2})


def _counting(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    n, color, shape = item
    scene = Scene(tuple(_obj(c, shape, color=color, rng=rng) for c in _free_cells(rng, n)))
    text = f"a picture of {NUMBER_WORDS[n]} {_desc(shape, color)}s"
    return text, [count_c(shape, n, color=color, exact=True)], scene


def _colors(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    color, shape = item
    scene = Scene((_obj(_free_cells(rng, 1)[0], shape, color=color, rng=rng),))
    return f"a picture of {_article(_desc(shape, color))}", [count_c(shape, 1, color=color)], scene


def _position(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    (c1, s1), rel, (c2, s2) = item
    cells = [(a, b) for a in _all_cells() for b in _all_cells()
             if a != b and rel in relation(Obj(*a, s1, c1, "small"), Obj(*b, s2, c2, "small"))]
    ca, cb = rng.choice(cells)
    scene = Scene((_obj(ca, s1, color=c1, rng=rng), _obj(cb, s2, color=c2, rng=rng)))
    a, b = {"shape": s1, "color": c1}, {"shape": s2, "color": c2}
    text = f"a {c1} {s1} is {_REL_TEXT[rel]} a {c2} {s2}"
    constraints = [count_c(s1, 1, color=c1), count_c(s2, 1, color=c2), relation_c(a, rel, b)]
    return text, constraints, scene


def _color_attr(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    (c1, s1), (c2, s2) = item
    return _pair(rng, {"shape": s1, "color": c1}, {"shape": s2, "color": c2})


def _dense(rng: random.Random, item) -> tuple[str, list[dict], Scene]:
    scene = sample_scene(rng, min_objects=3, max_objects=4)
    text = gold_caption(scene, rng, GOLD_TEMPLATES[item % len(GOLD_TEMPLATES)])
    return text, [cell_c(o) for o in scene.objects] + [total_c(len(scene))], scene


def _all_cells() -> list[tuple[int, int]]:
    return [(r, c) for r in range(3) for c in range(3)]


def _options(category: str) -> list[Any]:
    """Every distinct prompt of a category (dense: an endless supply of scene indices)."""
    sized = [(z, s) for s in SHAPES for z in (None, *SIZES)]
    colored = [(c, s) for c in COLORS for s in SHAPES]
    if category == "single_object":
        return sized
    if category == "two_objects":
        return [(a, b) for i, a in enumerate(sized) for b in sized[i + 1:] if a[1] != b[1]]
    if category == "counting":
        return [(n, c, s) for n in (2, 3, 4) for c in (None, *COLORS) for s in SHAPES]
    if category == "colors":
        return colored
    if category == "position":
        return [(a, r, b) for a in colored for r in RELATIONS for b in colored if a != b]
    if category == "color_attr":
        return [(a, b) for a in colored for b in colored if a[0] != b[0] and a[1] != b[1]]
    if category == "dense":
        return list(range(10_000))
    raise ValueError(f"unknown shapes category {category!r}; known: {CATEGORIES}")


_BUILDERS: dict[str, Callable] = {
    "single_object": _single, "two_objects": _two, "counting": _counting, "colors": _colors,
    "position": _position, "color_attr": _color_attr, "dense": _dense,
}


def shapes_suite(per_category: int = 12, seed: int = 0,
                 categories: tuple[str, ...] = CATEGORIES) -> Suite:
    """`per_category` distinct prompts per category (fewer where a category has fewer), drawn
    deterministically from `seed`: the same arguments always give the same suite and hash."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    records: list[PromptRecord] = []
    for category in categories:
        rng = random.Random(f"{seed}-{category}")
        options = _options(category)
        picks = rng.sample(options, min(per_category, len(options)))
        for k, item in enumerate(picks):
            text, constraints, scene = _BUILDERS[category](rng, item)
            records.append(PromptRecord(len(records), f"{category}-{k:03d}", category, text,
                                        constraints, scene.to_dict()))
    return Suite(f"shapes(per_category={per_category},seed={seed})", records, "builtin:shapes")


# ---- user prompt files -----------------------------------------------------------------------

def _first(row: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    return None


def _maybe_json(value: Any, what: str, where: str) -> Any:
    """CSV and parquet cells hold nested constraints/scenes as JSON text."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: column {what!r} is not valid JSON: {exc}") from None


# "utf-8-sig": spreadsheet programs save "CSV UTF-8" (and editors some txt/json files) with a
# byte-order mark, which plain "utf-8" would keep as part of the first column name or line.
_TEXT_ENCODING = "utf-8-sig"


def _rows_txt(path: Path) -> list[dict]:
    lines = path.read_text(encoding=_TEXT_ENCODING).splitlines()
    return [{"prompt": line.strip(), "_line": i + 1} for i, line in enumerate(lines) if line.strip()]


def _rows_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding=_TEXT_ENCODING).splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: each line must be a JSON object, got {type(row).__name__}")
        rows.append({**row, "_line": i + 1})
    return rows


def _rows_json(path: Path) -> list[dict]:
    """A JSON list of records, or COCO caption annotations (first caption per image)."""
    data = json.loads(path.read_text(encoding=_TEXT_ENCODING))
    if isinstance(data, dict) and "annotations" in data:
        files = {img["id"]: img.get("file_name") for img in data.get("images", [])}
        rows: dict[Any, dict] = {}
        for ann in data["annotations"]:
            rows.setdefault(ann["image_id"], {"id": str(ann["image_id"]), "prompt": ann["caption"],
                                              "image": files.get(ann["image_id"])})
        return [rows[k] for k in sorted(rows)]
    if isinstance(data, list):
        return [row if isinstance(row, dict) else {"prompt": row} for row in data]
    raise ValueError(f"{path}: expected a list of records or COCO caption annotations")


def _rows_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding=_TEXT_ENCODING) as fh:
        return [{**row, "_line": i + 2} for i, row in enumerate(csv.DictReader(fh))]


def _rows_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


_READERS = {".txt": _rows_txt, ".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv,
            ".parquet": _rows_parquet}


def load_prompt_file(path: str | Path) -> Suite:
    """Read prompts from a txt/jsonl/json/csv/parquet file. Rows with an empty prompt are skipped
    and listed in `Suite.skipped`; a file with no prompt column at all is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unknown prompt file type {path.suffix!r}; use one of {sorted(_READERS)}")
    rows = reader(path)
    if rows and not any(name in rows[0] for name in PROMPT_COLUMNS):
        raise ValueError(f"{path}: no prompt column; expected one of {PROMPT_COLUMNS}, "
                         f"found {sorted(k for k in rows[0] if not k.startswith('_'))}")
    records, skipped, ids = [], [], set()
    for i, row in enumerate(rows):
        where = f"{path}:{row.get('_line', f'row {i}')}"
        prompt = _first(row, PROMPT_COLUMNS)
        if not isinstance(prompt, str) or not prompt.strip():
            skipped.append({"row": i, "where": where, "reason": "empty or missing prompt"})
            continue
        rid = str(_first(row, ID_COLUMNS) or f"p{i:05d}")
        if rid in ids:
            raise ValueError(f"{where}: duplicate prompt id {rid!r}")
        ids.add(rid)
        records.append(PromptRecord(
            index=len(records), id=rid, category=str(row.get("category") or "prompts"), prompt=prompt,
            constraints=_maybe_json(row.get("constraints"), "constraints", where) or [],
            scene=_maybe_json(row.get("scene"), "scene", where),
            recaption=_first(row, RECAPTION_COLUMNS), image=_first(row, IMAGE_COLUMNS)))
    if not records:
        raise ValueError(f"{path}: holds no prompts ({len(skipped)} rows skipped)")
    return Suite(path.name, records, str(path.resolve()), skipped)


def load_suite(spec: str, per_category: int = 12, seed: int = 0) -> Suite:
    """`shapes` (the built-in suite) or a path to a prompt file."""
    if spec == "shapes":
        return shapes_suite(per_category=per_category, seed=seed)
    return load_prompt_file(spec)


def write_suite(suite: Suite, path: str | Path) -> None:
    """The resolved suite as JSONL (loads back with `load_prompt_file`)."""
    from t2i_recap.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in suite.records))
