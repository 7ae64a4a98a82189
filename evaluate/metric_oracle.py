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


def score_scene(scene: Scene, constraints: list[dict]) -> dict:
    verdicts = check_constraints(scene, constraints)
    return {"correct": float(all(verdicts)), "fraction": sum(verdicts) / len(verdicts),
            "verdicts": verdicts}


def _default_reader() -> Callable[[Image.Image], Scene]:
    from t2i_recap.shapes.oracle import read_scene

    return read_scene


def score_image(image: Image.Image, constraints: list[dict],
                reader: Callable[[Image.Image], Scene] | None = None) -> dict:
    """Oracle verdicts for one image; an image the oracle cannot read counts as an empty scene
    (a failure), and the reason is kept."""
    reader = reader or _default_reader()
    try:
        scene, error = reader(image), None
    except ValueError as exc:  # an unreadable image is a generation failure, not a crash
        scene, error = Scene(()), str(exc)
    out = score_scene(scene, constraints)
    out["scene"] = scene.to_dict()
    if error:
        out["error"] = error
    return out
