"""Exact compositional scoring: read each image back into a scene with the shapes oracle and check
the prompt's constraints on it.

An image is *correct* when every constraint holds (GenEval's per-image verdict); `fraction` is
the share of constraints that hold (DPG-Bench-style partial credit). Like GenEval, objects the
prompt does not mention are allowed, except where a constraint counts exactly (`counting`) or
fixes the total (`dense`).
"""

from __future__ import annotations

from typing import Callable

from PIL import Image

from t2i_recap.shapes.world import Obj, Scene, relation


def _matches(obj: Obj, spec: dict) -> bool:
    return all(spec.get(k) in (None, getattr(obj, k)) for k in ("shape", "color", "size"))


def _holds(scene: Scene, c: dict) -> bool:
    kind = c.get("type")
    if kind == "count":
        n = sum(_matches(o, c) for o in scene.objects)
        return n == c["n"] if c.get("exact") else n >= c["n"]
    if kind == "relation":
        return any(c["rel"] in relation(a, b) for a in scene.objects for b in scene.objects
                   if a is not b and _matches(a, c["a"]) and _matches(b, c["b"]))
    if kind == "cell":
        return any(o.cell == (c["row"], c["col"]) and _matches(o, c) for o in scene.objects)
    if kind == "total":
        return len(scene) == c["n"]
    raise ValueError(f"unknown constraint type {kind!r} in {c!r}; known: count, relation, cell, total")


def check_constraints(scene: Scene, constraints: list[dict]) -> list[bool]:
    """One verdict per constraint."""
    return [_holds(scene, c) for c in constraints]


def object_share(constraints: list[dict], verdicts: list[bool]) -> float | None:
    """Share of the prompt's objects found: its `cell` constraints (one per object: that cell holds
    that shape, colour and size) that hold. None when the prompt places no object by cell (every
    shapes category but `dense`)."""
    cells = [v for c, v in zip(constraints, verdicts) if c.get("type") == "cell"]
    return sum(cells) / len(cells) if cells else None


def score_scene(scene: Scene, constraints: list[dict]) -> dict:
    verdicts = check_constraints(scene, constraints)
    return {"correct": float(all(verdicts)), "fraction": sum(verdicts) / len(verdicts),
            "objects": object_share(constraints, verdicts), "verdicts": verdicts}


# An object read with less confidence than this does not count. The oracle reads every blob
# as its best-fitting shape; on uniform noise that gives many objects at confidence < 0.1,
# while a clean render reads at 1.0 (`t2i_recap.shapes.oracle.CellReading.confidence`).
MIN_CONFIDENCE = 0.15


def read_confident(image: Image.Image, min_confidence: float = MIN_CONFIDENCE) -> tuple[Scene, int]:
    """The oracle's scene, keeping objects read with at least `min_confidence`; also returns
    how many objects were dropped as too uncertain."""
    from t2i_recap.shapes.oracle import read_cells

    cells = [c for c in read_cells(image) if c.obj is not None]
    kept = tuple(c.obj for c in cells if c.confidence >= min_confidence)
    return Scene(kept), len(cells) - len(kept)


def score_image(image: Image.Image, constraints: list[dict], min_confidence: float = MIN_CONFIDENCE,
                reader: Callable[[Image.Image], Scene] | None = None) -> dict:
    """Oracle verdicts for one image; an image the oracle cannot read counts as an empty scene
    (a failure), and the reason is kept."""
    dropped, error = 0, None
    try:
        if reader is None:
            scene, dropped = read_confident(image, min_confidence)
        else:
            scene = reader(image)
    except ValueError as exc:  # an unreadable image is a generation failure, not a crash
        scene, error = Scene(()), str(exc)
    out = score_scene(scene, constraints)
    out["scene"] = scene.to_dict()
    out["uncertain_objects"] = dropped
    if error:
        out["error"] = error
    return out


def _noun(spec: dict) -> str:
    return " ".join(w for w in (spec.get("size"), spec.get("color"), spec.get("shape")) if w)


def describe_constraint(c: dict) -> str:
    """A short human reading of a constraint, for reports."""
    from t2i_recap.shapes.world import COLS, ROWS

    kind = c.get("type")
    if kind == "count":
        return f"{'exactly' if c.get('exact') else 'at least'} {c['n']} {_noun(c)}"
    if kind == "relation":
        return f"{_noun(c['a'])} {c['rel']} {_noun(c['b'])}"
    if kind == "cell":
        return f"{_noun(c)} at {ROWS[c['row']]} {COLS[c['col']]}"
    if kind == "total":
        return f"{c['n']} objects in total"
    return str(c)


def describe_scene(scene: dict) -> str:
    from t2i_recap.shapes.world import COLS, ROWS

    objs = scene.get("objects", [])
    if not objs:
        return "(nothing read)"
    return "; ".join(f"{o['size']} {o['color']} {o['shape']} at {ROWS[o['row']]} {COLS[o['col']]}" for o in objs)
