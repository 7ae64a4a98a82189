"""Caption field specs: one name for a caption, with one meaning on every input route.

  "txt"                the `<key>.txt` tar member (any member extension works, e.g. "caption")
  "json:org_caption"   a field of the `<key>.json` member
  "sidecar:re_caption" a column of the recaption sidecar, joined by key (training only)
  "column:text"        a column of a table (parquet, an HF dataset)

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
import json
from typing import Any, Mapping

KINDS = ("member", "json", "sidecar", "column")
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


def parse_spec(spec: str, where: str = "caption spec") -> CaptionSpec:
    """"json:org_caption" -> CaptionSpec("json", "org_caption"); "txt" -> CaptionSpec("member", "txt")."""
    if not isinstance(spec, str):
        raise CaptionSpecError(f"{where}: {spec!r} is not a string")
    if ":" not in spec:
        if not spec or not spec.replace("_", "").replace("-", "").isalnum():
            raise CaptionSpecError(f"{where}: {spec!r} is not a tar member extension or kind:name spec")
        return _not_the_json_member(CaptionSpec("member", spec.lower(), spec), where)
    kind, name = spec.split(":", 1)
    if kind not in KINDS[1:] or not name:
        raise CaptionSpecError(f"{where}: {spec!r} must be EXT, json:FIELD, sidecar:COLUMN or column:NAME")
    return _not_the_json_member(CaptionSpec(kind, name, spec), where)


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
    if spec.kind in ("member", "column"):
        value = view.fields.get(spec.name)
        if isinstance(value, (Mapping, list, tuple)):
            hint = " name one of its fields: json:FIELD" if spec.name == "json" else ""
            raise CaptionSpecError(f"caption spec {spec.text!r} names a {type(value).__name__}, not text;{hint}")
        return value
    if spec.kind == "json":
        meta = view.json()
        return None if meta is None else meta.get(spec.name)
    row = view.sidecar_row
    if row is None or row.get("status", "ok") not in view.captioned:
        return None
    return row.get(spec.name)


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
