"""Scene graphs of the shapes world: 1-4 objects on a 3x3 grid of cells.

An object is (shape, colour, size, row, col). Cells are distinct, so absolute positions
("top left") and pairwise relations (left of / right of / above / below) follow exactly from the
cells, and counts ("two red circles") from repeated (colour, shape) pairs.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Named colours and their RGB values; far apart in RGB so the oracle reads them exactly.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
MAX_OBJECTS = 4


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
    """One object; `row` and `col` index ROWS and COLS."""

    row: int
    col: int
    shape: str
    color: str
    size: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if not (0 <= self.row < 3 and 0 <= self.col < 3):
            raise ValueError(f"cell ({self.row}, {self.col}) is off the 3x3 grid")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A set of objects in distinct cells, kept sorted (row-major) so equal scenes compare equal."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects))
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        object.__setattr__(self, "objects", objs)

    def __len__(self) -> int:
        return len(self.objects)

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in data["objects"]))

    def counts(self) -> dict[tuple[str, str], int]:
        """How many objects of each (colour, shape)."""
        out: dict[tuple[str, str], int] = {}
        for o in self.objects:
            out[(o.color, o.shape)] = out.get((o.color, o.shape), 0) + 1
        return out

    def relations(self) -> list[tuple[int, str, int]]:
        """All pairwise relations as (i, relation, j) over object indices."""
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i != j:
                    out.extend((i, rel, j) for rel in relation(a, b))
        return out


def relation(a: Obj, b: Obj) -> list[str]:
    """Relations of `a` to `b`: any of "left of", "right of", "above", "below"."""
    out = []
    if a.col < b.col:
        out.append("left of")
    elif a.col > b.col:
        out.append("right of")
    if a.row < b.row:
        out.append("above")
    elif a.row > b.row:
        out.append("below")
    return out


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = MAX_OBJECTS,
                 repeat_prob: float = 0.25) -> Scene:
    """Draw a random scene. With `repeat_prob` an object copies an earlier one's colour and shape,
    so counting phrases ("two red circles") occur often enough to learn."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objs: list[Obj] = []
    for row, col in cells:
        if objs and rng.random() < repeat_prob:
            src = rng.choice(objs)
            shape, color = src.shape, src.color
        else:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        objs.append(Obj(row, col, shape, color, rng.choice(SIZES)))
    return Scene(tuple(objs))


def all_cells() -> Iterable[tuple[int, int]]:
    return ((r, c) for r in range(3) for c in range(3))
