"""Caption field specs: one name for a caption, with one meaning on every input route.

  "txt"                the `<key>.txt` tar member (any member extension works, e.g. "caption")
  "json:org_caption"   a field of the `<key>.json` member
  "sidecar:re_caption" a column of the recaption sidecar, joined by key (training only)
  "column:text"        a column of a table (parquet, an HF dataset)
  "released:re_caption" a column of the released Recap-DataComp-1B parquet, joined by sha256 or url
                       (`t2i_recap.released`; training only)
  "json:recaps[1]"     element 1 of a list-valued field or column (several recaptions per image)
  "first_sentence:recaption"  derived from another NAMED caption (`t2i_recap.data`'s data.captions):
                       its first sentence
  "no_positions:recaption"    derived: the named caption without its absolute-position phrases
  "short:recaption"           derived: no_positions, then (per caption, by its content) without its
                       colour words, its size words or both: an alt-text-like short caption

The routes agree because a sample is seen through one `SampleView`: a webdataset tar sample's
members, a row that `datasets.load_dataset("webdataset", ...)` made of the same tar (its columns
ARE the member extensions, its `json` column the parsed `.json` member) and a parquet / HF row all
hold `fields` by name, and `json:FIELD` always reads the `.json` member (or `json` column). So in
the official Recap-DataComp-1B download `txt` is the recaption and `json:org_caption` the alt-text,
whichever way the tars are read.

A spec that resolves to nothing for every sample of a shard is a `CaptionSpecError` naming the spec
and the shard (`SpecCoverage`), never a silent fallback to the other caption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Callable, Mapping

KINDS = ("member", "json", "sidecar", "column", "released")
_INDEX = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")
# The captioner's default original caption where none is named. A webdataset sample (tar or HF
# webdataset row): json org_caption (Recap-DataComp-1B keeps the alt-text there and the recaption in
# .txt), else .txt, else json caption. A table row: the first of these columns.
WEBDATASET_ORIGINAL = ("json:org_caption", "txt", "json:caption")
TABLE_ORIGINAL = ("column:org_caption", "column:caption", "column:txt", "column:text", "column:alt_text")
# Row columns `datasets`' webdataset builder adds; a row holding both came from a tar shard.
WEBDATASET_COLUMNS = ("__key__", "__url__")


class CaptionSpecError(ValueError):
    """A caption spec is malformed, names something that is not text, or finds nothing in a shard."""


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    kind: str
    """member, json, sidecar or column."""
    name: str
    """The member extension, json field, sidecar column or table column."""
    text: str
    """The spec as written (for messages)."""
    index: int | None = None
    """Element of a list-valued field or column ("json:recaps[1]" -> 1); None = the value itself."""

    @property
    def derived(self) -> bool:
        """True for a caption computed from another named caption (e.g. first_sentence:recaption)."""
        return self.kind in DERIVED


def parse_spec(spec: str, where: str = "caption spec") -> CaptionSpec:
    """"json:org_caption" -> CaptionSpec("json", "org_caption"); "txt" -> CaptionSpec("member", "txt")."""
    if not isinstance(spec, str):
        raise CaptionSpecError(f"{where}: {spec!r} is not a string")
    if ":" not in spec:
        if not spec or not spec.replace("_", "").replace("-", "").isalnum():
            raise CaptionSpecError(f"{where}: {spec!r} is not a tar member extension or kind:name spec")
        return _not_the_json_member(CaptionSpec("member", spec.lower(), spec), where)
    kind, name = spec.split(":", 1)
    if kind in DERIVED:
        if not name.isidentifier():
            raise CaptionSpecError(f"{where}: {spec!r}: {kind}: takes the name of another caption of data.captions")
        return CaptionSpec(kind, name, spec)
    if kind not in KINDS[1:] or not name:
        raise CaptionSpecError(f"{where}: {spec!r} must be EXT, json:FIELD, sidecar:COLUMN, column:NAME, released:COLUMN, "
                               f"FIELD[i] of a list, or {'|'.join(DERIVED)}:CAPTION_NAME")
    index = None
    m = _INDEX.match(name)
    if m:
        name, index = m["name"], int(m["index"])
    return _not_the_json_member(CaptionSpec(kind, name, spec, index), where)


def _not_the_json_member(spec: CaptionSpec, where: str) -> CaptionSpec:
    # The .json member (an HF webdataset row's `json` column) is img2dataset's metadata object, never a
    # caption: as text it would train on raw JSON, as a column it is a dict that holds no caption.
    if spec.kind in ("member", "column") and spec.name == "json":
        raise CaptionSpecError(f"{where}: {spec.text!r} names the whole .json metadata member, not a caption; "
                               "name one of its fields: json:FIELD (e.g. json:org_caption)")
    return spec


@dataclasses.dataclass
class SampleView:
    """What a caption spec can read in one sample, whatever route it came by."""

    fields: Mapping[str, Any]
    """Tar members by extension, or a row's columns by name."""
    sidecar_row: Mapping[str, Any] | None = None
    """The sample's recaption sidecar row, when one is joined."""
    captioned: tuple[str, ...] = ("ok", "success")
    """Sidecar statuses of a usable recaption (skipped / failed rows hold none)."""
    released_row: Mapping[str, Any] | None = None
    """The sample's row of the released captions (data.released_captions), when one matched."""
    recaption_flagged: bool = False
    """The sidecar row's recaption was flagged by the captioner and data.flagged_recaptions=fallback:
    its generated columns (every sidecar column but org_caption) read as missing."""
    _json: Any = dataclasses.field(default=None, init=False, repr=False)
    _json_read: bool = dataclasses.field(default=False, init=False, repr=False)

    def json(self) -> Mapping[str, Any] | None:
        """The `.json` member / `json` column as an object; a `CaptionSpecError` when it is not one."""
        if not self._json_read:
            self._json_read = True
            self._json = _as_object(self.fields.get("json"))
        return self._json


def _as_object(value: Any) -> Mapping[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        try:
            value = json.loads(bytes(value) if not isinstance(value, str) else value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CaptionSpecError(f"the json member is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise CaptionSpecError(f"the json member is a {type(value).__name__}, not an object")
    return value


def resolve(spec: CaptionSpec, view: SampleView) -> Any:
    """The raw caption value (bytes or text) `spec` names in `view`, or None when the sample lacks it."""
    if spec.derived:
        raise CaptionSpecError(f"caption spec {spec.text!r} is derived from another caption; resolve it with "
                               "resolve_named")
    return _element(spec, _value(spec, view))


def _value(spec: CaptionSpec, view: SampleView) -> Any:
    if spec.kind in ("member", "column"):
        value = view.fields.get(spec.name)
        if isinstance(value, Mapping):
            hint = " name one of its fields: json:FIELD" if spec.name == "json" else ""
            raise CaptionSpecError(f"caption spec {spec.text!r} names a {type(value).__name__}, not text;{hint}")
        return value
    if spec.kind == "json":
        meta = view.json()
        return None if meta is None else meta.get(spec.name)
    if spec.kind == "released":
        return None if view.released_row is None else view.released_row.get(spec.name)
    row = view.sidecar_row
    if row is None or row.get("status", "ok") not in view.captioned:
        return None
    if view.recaption_flagged and spec.name != "org_caption":
        return None
    return row.get(spec.name)


def _element(spec: CaptionSpec, value: Any) -> Any:
    """The list element `spec.index` names (None when the list is shorter); a list without an index is an error."""
    is_list = isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes)))
    if spec.index is None:
        if is_list:
            raise CaptionSpecError(f"caption spec {spec.text!r} holds a list of {len(value)} captions, not text; "
                                   f"name one element: {spec.text}[0]")
        return value
    if value is None:
        return None
    if not is_list:
        raise CaptionSpecError(f"caption spec {spec.text!r} indexes a {type(value).__name__}, not a list")
    value = list(value)
    return value[spec.index] if spec.index < len(value) else None


# Derived captions: a function of another named caption's (cleaned) text; None stays None.
_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "st", "prof", "jr", "sr", "no", "approx",
                  "fig", "inc", "ltd", "co", "mt", "ft", "u.s", "u.k", "a.m", "p.m"}
_END = re.compile(r"([.!?]+)([\"')\]]*)(\s+)(?=[\"'(\[]?[A-Z0-9])")
# An all-lower-case caption (a lower-casing captioner or tokenizer) has no capital to start the next
# sentence: there a single ., ! or ? before a lower-case letter ends it (an ellipsis does not).
_END_LOWER = re.compile(r"((?<!\.)\.(?!\.)|[!?]+)([\"')\]]*)(\s+)(?=[\"'(\[]?[a-z0-9])")
DERIVED_VERSIONS = {"first_sentence": 2, "no_positions": 1, "short": 1, "lead": 1, "listing": 1, "first_things": 1}
"""Rule versions of the derived captions: part of the feature cache's fingerprint, so a cache made
under an older rule is rebuilt."""


def first_sentence(text: str | None) -> str | None:
    """The first sentence of `text`: up to the first ., ! or ? that ends a word and is followed by
    whitespace and a capital letter or digit. Abbreviations (e.g., Dr., St.), single initials
    (J. Smith), decimals (3.5) and ellipses inside a sentence do not end it. Text without such an end
    is one sentence and returned whole. In a text without capitals, a single ., ! or ? followed by
    whitespace and a lower-case letter or digit ends it too."""
    if text is None:
        return None
    ends = _END if any(c.isupper() for c in text) else _END_LOWER
    for m in ends.finditer(text):
        before = text[:m.start()]
        word = before.rsplit(None, 1)[-1].lower() if before.split() else ""
        if m.group(1) == "." and (word.rstrip(".") in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        return text[:m.end(2)].strip() or None
    return text.strip() or None


# An absolute-position phrase: in/on/at/near the [very|far] [up to two of top, upper, middle, left,
# ...] top|bottom|left|right|center|corner|side|edge|..., optionally "of the image|picture|...".
# A phrase followed by "of" anything else is a relation ("on the left of the car") and is kept.
_PLACE = r"(?:top|bottom|upper|lower|middle|center|centre|central|left|right|left-hand|right-hand)"
_PLACE_END = (r"(?:top|bottom|left|right|center|centre|middle|corner|side|edge|half|part|background|"
              r"foreground|distance)")
_POSITION = re.compile(
    rf"(?:\s*,)?\s*\b(?:in|on|at|near)\s+the\s+(?:(?:very|far|extreme)\s+)?(?:{_PLACE}[\s-]+){{0,2}}{_PLACE_END}"
    r"(?:\s+(?:corner|side|edge|half|part|portion|area|region|section))?"
    r"(?:\s+of\s+the\s+(?:image|picture|photo|photograph|frame|scene|canvas|shot))?\b(?!\s+of\b)",
    re.IGNORECASE)
# "X is in the center." -> "X." rather than "X is."
_BARE_VERB = re.compile(r"\s+(?:is|are|sits|sit|lies|lie|stands|stand|is located|are located|is placed|are placed)"
                        r"(?=\s*(?:[.,;:!?]|$))", re.IGNORECASE)


def no_positions(text: str | None) -> str | None:
    """`text` without its absolute-position phrases ("in the upper left corner", "at the bottom",
    "on the right side of the image", "in the background"), the way short alt-texts leave out where
    things are. Relations between things stay ("to the left of the cat", "on the left of the car",
    "above the table"). An English rule over the captioner's usual phrasing, not a parser; a caption
    that would be left empty is None (so the draw falls back, counted)."""
    if text is None:
        return None
    out = _BARE_VERB.sub("", _POSITION.sub("", text))
    out = re.sub(r"\s+([.,;:!?])", r"\1", out)
    out = re.sub(r"([,;:])(?=[.!?])", "", out)
    out = re.sub(r"\s{2,}", " ", out).strip()
    out = re.sub(r"^[,;:.]\s*", "", out)
    if out and text.lstrip()[:1].isupper():
        out = out[0].upper() + out[1:]
    return out if re.search(r"\w", out) else None


# Basic English colour and size words: what `short` may leave out.
_COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white",
                 "gray", "grey", "beige", "golden", "gold", "silver", "teal", "cyan", "magenta", "maroon", "navy",
                 "turquoise")
_SIZE_WORDS = ("small", "little", "large", "big", "tiny", "huge", "giant", "enormous", "medium-sized")


def _drop_words(text: str, words: tuple[str, ...]) -> str:
    """`text` without `words` (whole words, any case) where a word follows them, except "one(s)" ("a big
    one" stays); an article before them agrees with what follows ("a big orange" -> "an orange")."""
    alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    pattern = re.compile(rf"\b(?P<art>an?\s+)?(?P<words>(?:(?:{alternatives})\s+)+)(?!ones?\b)(?=(?P<next>\w))", re.IGNORECASE)

    def repl(m: re.Match) -> str:
        art = m.group("art")
        if not art:
            return ""
        new = "an " if m.group("next").lower() in "aeiou" else "a "
        return new.capitalize() if art[0].isupper() else new

    return pattern.sub(repl, text)


def _attributes_left_out(text: str, digest: bytes) -> str | None:
    """`text` with its colour words, its size words, both or neither left out, by two bits of `digest`."""
    choice = digest[0] & 3
    words = (_COLOUR_WORDS if choice & 1 else ()) + (_SIZE_WORDS if choice & 2 else ())
    out = re.sub(r"\s{2,}", " ", _drop_words(text, words)).strip() if words else text
    return out if re.search(r"\w", out) else None


def short(text: str | None) -> str | None:
    """An alt-text-like short form of `text`: `no_positions`, and then, for three captions in four, its
    colour words, its size words or both left out. Which is decided by the caption's own content
    (its SHA-256), so one caption always gives the same short form (the feature cache holds it) and
    the choice is spread evenly over a dataset."""
    base = no_positions(text)
    if base is None:
        return None
    return _attributes_left_out(base, hashlib.sha256(text.encode("utf-8")).digest())


# The separators of a listing ("a red circle, a blue square and a green triangle"), and a member
# that only refers back to the group before it ("two squares, a big one and a small one").
_LIST_SEPARATOR = re.compile(r"\s*(?:[,;]\s*(?:and\s+)?|\s\band\s+)", re.IGNORECASE)
_BACK_REFERENCE = re.compile(r"^(?:an?\s+|the\s+)?(?:[\w-]+\s+)?ones?\b", re.IGNORECASE)


def _things(text: str) -> tuple[list[str], bytes] | None:
    """The things the first sentence of `text` lists (without positions, an introduction up to a
    colon, a closing stop or back references), and the text's SHA-256."""
    base = no_positions(first_sentence(text))
    if base is None:
        return None
    base = re.sub(r"[\s.!?]+$", "", base)
    if ":" in base:
        base = base.split(":", 1)[1].strip()
    things = [part for i, part in enumerate(_LIST_SEPARATOR.split(base))
              if part and (i == 0 or not _BACK_REFERENCE.match(part))]
    return (things, hashlib.sha256(text.encode("utf-8")).digest()) if things else None


def listing(text: str | None) -> str | None:
    """What the first sentence of `text` lists, said the way an alt-text says it: without positions,
    without an introduction up to a colon ("There are three shapes:"), without a closing full stop,
    the things split at commas, semicolons and "and" and joined again by commas and a last "and" (a member such as "a
    big one" that only refers back to the group before it is not a thing of its own), and then like
    `short` its colours, sizes, both or neither left out by the caption's SHA-256. An English rule
    (an "and" inside a name such as "black and white" splits it too)."""
    found = _things(text) if text is not None else None
    if found is None:
        return None
    things, digest = found
    return _attributes_left_out(", ".join(things[:-1]) + " and " + things[-1] if len(things) > 1 else things[0], digest)


def first_things(text: str | None) -> str | None:
    """`listing` cut after its first thing or its first two (by the caption's SHA-256), with every
    colour and size word kept."""
    found = _things(text) if text is not None else None
    if found is None:
        return None
    things, digest = found
    return " and ".join(things[:1 + ((digest[1] >> 7) & 1)])


def lead(text: str | None) -> str | None:
    """The lead of `text`, the way an alt-text names a picture's main things and nothing else:
    `listing` cut after its first thing or its first two. Which count, and which attributes are left
    out, are decided by the caption's SHA-256, so one caption always gives the same lead."""
    found = _things(text) if text is not None else None
    if found is None:
        return None
    things, digest = found
    return _attributes_left_out(" and ".join(things[:1 + ((digest[1] >> 7) & 1)]), digest)


DERIVED: dict[str, Callable[[str | None], str | None]] = {"first_sentence": first_sentence,
                                                          "no_positions": no_positions, "short": short,
                                                          "lead": lead, "listing": listing,
                                                          "first_things": first_things}


def caption_order(specs: Mapping[str, CaptionSpec], where: str = "data.captions") -> list[str]:
    """Names in an order where every derived caption follows the caption it is made from; errors
    name an unknown source caption or a cycle."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if name in chain:
            raise CaptionSpecError(f"{where}: derived captions form a cycle: {' -> '.join(chain + (name,))}")
        spec = specs[name]
        if spec.derived:
            if spec.name not in specs:
                raise CaptionSpecError(f"{where}.{name}: {spec.text!r} derives from caption {spec.name!r}, which is "
                                       f"not one of the named captions ({', '.join(specs)})")
            visit(spec.name, chain + (name,))
        state[name] = "done"
        order.append(name)

    for name in specs:
        visit(name, ())
    return order


def resolve_named(specs: Mapping[str, CaptionSpec], view: SampleView,
                  clean: Callable[[Any], str | None]) -> dict[str, str | None]:
    """Every named caption of one sample, cleaned by `clean`, derived ones from their source; names in `specs` order."""
    out: dict[str, str | None] = {}
    for name in caption_order(specs):
        spec = specs[name]
        out[name] = DERIVED[spec.kind](out[spec.name]) if spec.derived else clean(resolve(spec, view))
    return {name: out[name] for name in specs}


def resolve_first(specs: tuple[CaptionSpec, ...], view: SampleView) -> tuple[Any, CaptionSpec | None]:
    """The first of `specs` that holds a string or bytes value (the captioner's default), and which one."""
    for spec in specs:
        value = resolve(spec, view)
        if isinstance(value, (str, bytes)) and value:
            return value, spec
    return None, None


def is_text(value: Any) -> bool:
    """A caption that holds at least one non-blank character."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    return isinstance(value, str) and bool(value.strip())


class SpecCoverage:
    """Counts, per spec, the samples of one shard it found a caption in; `finish` refuses a spec that found none."""

    def __init__(self, specs: dict[str, CaptionSpec], shard: str) -> None:
        self.specs, self.shard = specs, shard
        self.found = {role: 0 for role in specs}
        self.samples = 0

    def add(self, role_values: dict[str, Any]) -> None:
        self.samples += 1
        for role, value in role_values.items():
            self.found[role] += is_text(value)

    def finish(self) -> None:
        if self.samples == 0:
            return
        for role, n in self.found.items():
            if n == 0:
                raise CaptionSpecError(
                    f"caption spec {self.specs[role].text!r} ({role}) resolves to nothing in any of the "
                    f"{self.samples} samples of shard {self.shard!r}; name the field that holds the caption "
                    "(txt, json:FIELD, sidecar:COLUMN or column:NAME)")
