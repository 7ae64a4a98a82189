"""Read a dense caption of the shapes world back into its scene graph.

Exact on every gold caption (`captions.gold_caption`, every template and synonym) and lenient
on model-written captions, which the caption-fidelity metric parses: nothing raises on text. A
word the world does not know, an object missing its size, colour, shape or position, a count
that does not add up, or a relation sentence that contradicts the positions is recorded in
`ParsedCaption.problems`; complete objects are still returned.

The caption is read word by word. An object mention is `[a|an|number] [size] [colour] shape
[position words]`; "two red circles, a small one at the top and a big one on the left" opens a
group whose members ("a small one") take the group's colour and shape. "There are three shapes"
declares the object count. A sentence holding a relation ("left of", "above", ...) relates two
objects named by colour and shape and adds none.
"""

from __future__ import annotations

import dataclasses
import re

from t2i_recap.shapes.captions import NUMBER_WORDS, RELATION_WORDS, SIZE_WORDS
from t2i_recap.shapes.world import COLORS, SHAPES, Obj, Scene, relation

_SIZES = {word: size for size, words in SIZE_WORDS.items() for word in words}
_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()} | {str(n): n for n in NUMBER_WORDS}
_SHAPES = {shape: shape for shape in SHAPES} | {shape + "s": shape for shape in SHAPES}
# Position words: a row, a column, or neither ("center", "middle": the middle row or column).
_ROW_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL_WORDS = {"left": 0, "right": 2}
_NEUTRAL_POSITION = {"center", "centre", "middle"}
_GENERIC_SHAPE = {"shape", "shapes", "object", "objects"}
_DETERMINERS = {"a", "an"}
_FILLER = {"the", "of", "in", "at", "on", "is", "sits", "are", "there", "picture", "image",
           "showing", "and", "side", "corner", "to", "with", "it", "this", "its", ",", ":"}
# Relation phrases, longest first so "to the left of" wins over "left of".
_RELATIONS = sorted(((tuple(phrase.split()), rel) for rel, phrases in RELATION_WORDS.items()
                     for phrase in phrases), key=lambda item: -len(item[0]))
_SENTENCE_END = {".", "!", "?", ";"}
_TOKEN_RE = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


@dataclasses.dataclass
class ParsedCaption:
    """What a caption says.

    `objects`: the fully described objects. `scene`: them as a Scene, or None when two share a
    cell. `partial`: mentions missing a field (dicts of the fields found). `relations`: each
    relation sentence as (subject, relation, object, holds), subject/object "colour shape",
    holds None when a side could not be resolved. `declared_count`: from "there are N shapes".
    `problems`: everything that did not read cleanly, one line each.
    """

    objects: list[Obj]
    scene: Scene | None
    problems: list[str]
    partial: list[dict] = dataclasses.field(default_factory=list)
    relations: list[tuple[str, str, str, bool | None]] = dataclasses.field(default_factory=list)
    declared_count: int | None = None

    @property
    def clean(self) -> bool:
        return not self.problems and self.scene is not None


@dataclasses.dataclass
class _Mention:
    count: int = 1
    size: str | None = None
    color: str | None = None
    shape: str | None = None
    pronoun: bool = False  # "a small one": colour and shape come from the open group
    plural: bool = False
    rows: set = dataclasses.field(default_factory=set)
    cols: set = dataclasses.field(default_factory=set)
    has_position: bool = False

    @property
    def empty(self) -> bool:
        return not (self.size or self.color or self.shape or self.pronoun or self.has_position)


@dataclasses.dataclass
class _Group:
    count: int
    color: str | None
    shape: str | None
    members: int = 0


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def _sentences(tokens: list[str]) -> list[list[str]]:
    out, current = [], []
    for tok in tokens:
        if tok in _SENTENCE_END:
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        out.append(current)
    return out


def _find_relation(tokens: list[str]) -> tuple[int, int, str] | None:
    """(start, end, relation) of the first relation phrase in a sentence, if any."""
    for i in range(len(tokens)):
        for words, rel in _RELATIONS:
            if tuple(tokens[i:i + len(words)]) == words:
                return i, i + len(words), rel
    return None


class _Reader:
    """Turns the sentences of one caption into objects, partial mentions and problems."""

    def __init__(self) -> None:
        self.objects: list[Obj] = []
        self.partial: list[dict] = []
        self.problems: list[str] = []
        self.unknown: list[str] = []
        self.declared: int | None = None
        self.group: _Group | None = None
        self.current: _Mention | None = None
        self.relation_sentences: list[tuple[str | None, str | None, str, str | None, str | None]] = []

    # -- sentences -------------------------------------------------------------------------
    def read_sentence(self, tokens: list[str]) -> None:
        found = _find_relation(tokens)
        if found is not None:
            self._read_relation(tokens, *found)
            return
        for tok in tokens:
            self._read_token(tok)
        self._finish()
        self._close_group()

    def _read_relation(self, tokens: list[str], start: int, end: int, rel: str) -> None:
        subject, obj = self._name(tokens[:start]), self._name(tokens[end:])
        self.relation_sentences.append((*subject, rel, *obj))

    def _name(self, tokens: list[str]) -> tuple[str | None, str | None]:
        """(colour, shape) named in one side of a relation sentence."""
        color = shape = None
        for tok in tokens:
            if tok in COLORS:
                color = tok
            elif tok in _SHAPES:
                shape = _SHAPES[tok]
            elif tok not in _FILLER and tok not in _SIZES and tok not in _DETERMINERS:
                self.unknown.append(tok)
        return color, shape

    # -- words -----------------------------------------------------------------------------
    def _start(self, **fields) -> _Mention:
        self._finish()
        self.current = _Mention(**fields)
        return self.current

    def _read_token(self, tok: str) -> None:
        cur = self.current
        if tok in _DETERMINERS:
            self._start()
        elif tok in _NUMBERS:
            if tok == "one" and cur is not None and not (cur.color or cur.shape) and not cur.has_position:
                cur.pronoun = True  # "a small one"
            else:
                self._start(count=_NUMBERS[tok])
        elif tok in _GENERIC_SHAPE:
            if cur is not None and not (cur.size or cur.color or cur.shape or cur.pronoun):
                self.declared = cur.count  # "there are three shapes"
                self.current = None
            else:
                self.problems.append(f"generic word {tok!r} inside an object mention")
        elif tok in _SIZES or tok in COLORS or tok in _SHAPES:
            self._read_attribute(tok)
        elif tok in _ROW_WORDS or tok in _COL_WORDS or tok in _NEUTRAL_POSITION:
            self._read_position(tok)
        elif tok not in _FILLER:
            self.unknown.append(tok)

    def _read_attribute(self, tok: str) -> None:
        cur = self.current
        field = "size" if tok in _SIZES else "color" if tok in COLORS else "shape"
        value = _SIZES.get(tok) or (tok if tok in COLORS else _SHAPES.get(tok))
        # A new mention starts without a determiner once the current one is described.
        if cur is None or cur.has_position or getattr(cur, field) is not None or cur.shape or cur.pronoun:
            cur = self._start()
        setattr(cur, field, value)
        if field == "shape":
            cur.plural = tok != value

    def _read_position(self, tok: str) -> None:
        cur = self.current
        if cur is None or cur.empty:
            self.problems.append(f"position word {tok!r} belongs to no object")
            return
        cur.has_position = True
        if tok in _ROW_WORDS:
            cur.rows.add(_ROW_WORDS[tok])
        elif tok in _COL_WORDS:
            cur.cols.add(_COL_WORDS[tok])

    # -- mentions --------------------------------------------------------------------------
    def _finish(self) -> None:
        cur, self.current = self.current, None
        if cur is None or cur.empty:
            return
        if cur.pronoun:
            self._finish_member(cur)
        elif cur.count > 1 or (cur.plural and not cur.has_position):
            self._open_group(cur)
        else:
            self._close_group()
            self._add(cur)

    def _open_group(self, cur: _Mention) -> None:
        self._close_group()
        self.group = _Group(cur.count, cur.color, cur.shape)
        if cur.has_position or cur.size:
            self.problems.append(f"group '{self._describe(cur)}' gives a size or position for all of "
                                 "its members at once")

    def _finish_member(self, cur: _Mention) -> None:
        if self.group is None:
            self.problems.append(f"'{self._describe(cur)}' refers to no group ('one' without 'two ...')")
        else:
            self.group.members += 1
            if cur.color and cur.color != self.group.color:
                self.problems.append(f"member colour {cur.color} differs from its group's {self.group.color}")
            cur.color = cur.color or self.group.color
            cur.shape = cur.shape or self.group.shape
        self._add(cur)

    def _close_group(self) -> None:
        group, self.group = self.group, None
        if group is not None and group.members != group.count:
            self.problems.append(f"group of {group.count} {group.color} {group.shape}s lists "
                                 f"{group.members} members")

    def _add(self, cur: _Mention) -> None:
        fields = {"size": cur.size, "color": cur.color, "shape": cur.shape}
        cell = self._cell(cur)
        if cell is not None:
            fields["row"], fields["col"] = cell
        missing = [k for k in ("size", "color", "shape", "row") if fields.get(k) is None]
        if cur.has_position and cell is None:  # contradicting position words, already reported
            missing.remove("row")
        if missing:
            names = ["position" if k == "row" else k for k in missing]
            self.problems.append(f"object '{self._describe(cur)}' has no {', '.join(names)}")
        if missing or cell is None:
            self.partial.append({k: v for k, v in fields.items() if v is not None})
            return
        self.objects.append(Obj(**fields))

    def _cell(self, cur: _Mention) -> tuple[int, int] | None:
        if not cur.has_position:
            return None
        if len(cur.rows) > 1 or len(cur.cols) > 1:
            self.problems.append(f"object '{self._describe(cur)}' has contradicting position words")
            return None
        return (next(iter(cur.rows), 1), next(iter(cur.cols), 1))

    @staticmethod
    def _describe(cur: _Mention) -> str:
        shape = cur.shape and (cur.shape + "s" if cur.count > 1 else cur.shape)
        words = [NUMBER_WORDS.get(cur.count) if cur.count > 1 else None, cur.size, cur.color,
                 shape or ("one" if cur.pronoun else None)]
        return " ".join(w for w in words if w) or "?"


def _check_relations(reader: _Reader, objects: list[Obj]) -> list[tuple[str, str, str, bool | None]]:
    out = []
    for s_color, s_shape, rel, o_color, o_shape in reader.relation_sentences:
        subject, obj = f"{s_color or '?'} {s_shape or '?'}", f"{o_color or '?'} {o_shape or '?'}"
        a = [o for o in objects if (o.color, o.shape) == (s_color, s_shape)]
        b = [o for o in objects if (o.color, o.shape) == (o_color, o_shape)]
        holds = None
        if len(a) != 1 or len(b) != 1:
            which = subject if len(a) != 1 else obj
            reader.problems.append(f"relation '{subject} {rel} {obj}': '{which}' names "
                                   f"{len(a) if which == subject else len(b)} described objects, not 1")
        else:
            holds = rel in relation(a[0], b[0])
            if not holds:
                reader.problems.append(f"relation '{subject} {rel} {obj}' contradicts the positions")
        out.append((subject, rel, obj, holds))
    return out


def parse_caption(text: str) -> ParsedCaption:
    """Parse one caption; never raises on text (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_caption expects a str, got {type(text).__name__}")
    reader = _Reader()
    for sentence in _sentences(tokenize(text)):
        reader.read_sentence(sentence)
    if reader.unknown:
        reader.problems.append("unknown words: " + ", ".join(dict.fromkeys(reader.unknown)))
    objects = reader.objects
    relations = _check_relations(reader, objects)
    described = len(objects) + len(reader.partial)
    if reader.declared is not None and reader.declared != described:
        reader.problems.append(f"caption declares {reader.declared} shapes but describes {described}")
    try:
        scene: Scene | None = Scene(tuple(objects))
    except ValueError as exc:
        scene = None
        reader.problems.append(f"objects conflict: {exc}")
    return ParsedCaption(objects, scene, reader.problems, reader.partial, relations, reader.declared)
