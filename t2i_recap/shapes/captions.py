"""Two caption kinds for the shapes world.

* `web_caption`: short noisy alt-text, the DataComp analogue: file-name-like strings, generic
  words, at most one object's name, sometimes with the wrong colour.
* `gold_caption`: dense captions with varied phrasing (several templates, synonyms), the
  high-quality analogue; `t2i_recap.shapes.parser` reads every template back into the scene.
"""

from __future__ import annotations

import random

from t2i_recap.shapes.world import COLORS, Obj, Scene, relation

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
ROW_WORDS = {0: ("top", "upper"), 2: ("bottom", "lower")}
COL_WORDS = {0: "left", 2: "right"}
RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}
GOLD_TEMPLATES = ("picture", "showing", "there_are", "sentences")


def position_phrase(row: int, col: int, rng: random.Random) -> str:
    """An absolute-position phrase for a cell, e.g. "in the top left corner"."""
    if row == 1 and col == 1:
        return rng.choice(("in the center", "in the middle"))
    if row == 1:
        side = COL_WORDS[col]
        return rng.choice((f"on the {side}", f"at the middle {side}", f"on the {side} side"))
    vert = rng.choice(ROW_WORDS[row])
    if col == 1:
        return rng.choice((f"at the {ROW_WORDS[row][0]}", f"at the {vert} center"))
    side = COL_WORDS[col]
    return rng.choice((f"in the {vert} {side} corner", f"at the {vert} {side}"))


def _groups(scene: Scene) -> list[list[Obj]]:
    """Objects grouped by (colour, shape), groups in order of their first object."""
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    return list(groups.values())


def _group_phrase(group: list[Obj], rng: random.Random, det: str = "a") -> str:
    first = group[0]
    if len(group) == 1:
        return f"{det} {rng.choice(SIZE_WORDS[first.size])} {first.color} {first.shape} {position_phrase(first.row, first.col, rng)}"
    parts = [f"a {rng.choice(SIZE_WORDS[o.size])} one {position_phrase(o.row, o.col, rng)}" for o in group]
    return f"{NUMBER_WORDS[len(group)]} {first.color} {first.shape}s, {_join(parts)}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation_sentences(scene: Scene, rng: random.Random, max_sentences: int = 2) -> list[str]:
    """Sentences like "The red circle is left of the blue square." between uniquely named objects."""
    counts = scene.counts()
    unique = [o for o in scene.objects if counts[(o.color, o.shape)] == 1]
    pairs = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1:]]
    rng.shuffle(pairs)
    out = []
    for a, b in pairs[:max_sentences]:
        if rng.random() < 0.5:
            a, b = b, a
        rel = rng.choice(relation(a, b))
        out.append(f"The {a.color} {a.shape} is {rng.choice(RELATION_WORDS[rel])} the {b.color} {b.shape}.")
    return out


def gold_caption(scene: Scene, rng: random.Random, template: str | None = None) -> str:
    """A dense caption naming every object's size, colour, shape and position, plus relations."""
    template = template or rng.choice(GOLD_TEMPLATES)
    groups = _groups(scene)
    if template == "sentences":
        sentences = []
        for g in groups:
            phrase = _group_phrase(g, rng)
            if len(g) == 1:  # "A small red circle is in the center."
                o = g[0]
                phrase = (f"a {rng.choice(SIZE_WORDS[o.size])} {o.color} {o.shape} "
                          f"{rng.choice(('is', 'sits'))} {position_phrase(o.row, o.col, rng)}")
            sentences.append(phrase[0].upper() + phrase[1:] + ".")
        body = " ".join(sentences)
    else:
        listing = _join([_group_phrase(g, rng) for g in groups])
        if template == "picture":
            body = f"A picture of {listing}."
        elif template == "showing":
            body = f"An image showing {listing}."
        elif template == "there_are":
            n = len(scene)
            body = (f"There is one shape: {listing}." if n == 1
                    else f"There are {NUMBER_WORDS[n]} shapes: {listing}.")
        else:
            raise ValueError(f"unknown gold caption template {template!r}; known: {GOLD_TEMPLATES}")
    return " ".join([body, *_relation_sentences(scene, rng)])


_GENERIC = ("abstract shapes", "geometric pattern", "colorful shapes background", "stock illustration",
            "free clipart", "simple wallpaper", "shapes", "graphic design", "kids drawing", "minimal art")
_FILES = ("IMG_{n4}.jpg", "DSC{n5}", "image_{n3}.png", "untitled-{n2}", "photo {n4}", "{n6}.jpg")
_OBJECT_FORMS = ("{color} {shape}", "{shape} icon", "{color} {shape} vector", "{shape}", "{color} {shape} clipart",
                 "{shape} shape", "{color} {shape} on white")


def _file_name(rng: random.Random) -> str:
    digits = {f"n{k}": "".join(rng.choice("0123456789") for _ in range(k)) for k in (2, 3, 4, 5, 6)}
    return rng.choice(_FILES).format(**digits)


def web_caption(scene: Scene, rng: random.Random, wrong_color_prob: float = 0.3) -> str:
    """Short, noisy alt-text: mostly uninformative, at most one object, colour sometimes wrong."""
    kind = rng.random()
    if kind < 0.3:
        return _file_name(rng)
    if kind < 0.55:
        return rng.choice(_GENERIC)
    obj = rng.choice(scene.objects)
    color = obj.color
    if rng.random() < wrong_color_prob:
        color = rng.choice([c for c in COLORS if c != obj.color])
    text = rng.choice(_OBJECT_FORMS).format(color=color, shape=obj.shape)
    if rng.random() < 0.3:
        text = f"{rng.choice(_GENERIC)} - {text}"
    return text
