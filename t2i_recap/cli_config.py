"""Command-line flags declared from config dataclasses: the one mechanism every command uses.

A command names its public flags and the dotted config field each one sets; the flag's type and
choices come from the field's annotation and its `--help` text from the field's docstring (the
string literal under the field, as in t2i_recap/config.py). Every command also takes
`--config FILE` (a YAML file or a shipped recipe name) and `--set KEY=VALUE` (repeatable), and
the value of a field is, later layers winning:

    the dataclass default < the --config file < --set < an explicit flag

    parser = argparse.ArgumentParser(prog="t2i-recap eval run")
    add_config_arguments(parser, EvalConfig, {"--model": "model", "--out": "out"}, required=("--out",))
    cfg = config_from_args(EvalConfig, parser.parse_args(argv))

Invocation options that are not part of a saved config (`--resume`, `--overwrite`) are fields of
a second, small dataclass declared with `add_options` and read with `options_from_args`; they come
from flags only.

jsonargparse and tyro were weighed against this and left out: both read their own YAML and give
every field a flag under its full dotted name (`--data.shards`), where the commands keep short
public flags (`--input`) mapped onto nested fields, recipe names for `--config`
(config_registry.resolve_config) and the errors of t2i_recap.config that name the file and key.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from t2i_recap.config import ConfigError, check_keys, from_dict, layered_data

T = TypeVar("T")

_CONFIG_KEY = "_cli_config"  # namespace attribute: the flag table of add_config_arguments
_OPTIONS_KEY = "_cli_options"  # namespace attribute: {options class: flag table}


@dataclasses.dataclass(frozen=True)
class _Flag:
    cls: type
    flag: str
    dotted: str
    dest: str
    required: bool


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal right under it), over `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined where no source is kept (an interactive session)
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _field(cls: type, dotted: str) -> tuple[Any, str, Any]:
    """(annotation, docstring, default) of the dotted field `a.b.c` of dataclass `cls`."""
    owner, tp = cls, None
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(owner):
            raise TypeError(f"{cls.__name__}: {'.'.join(parts[:i])} is not a config section (in {dotted!r})")
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if part not in fields:
            raise TypeError(f"{cls.__name__} has no field {dotted!r} ({part!r} is not in {owner.__name__})")
        tp = typing.get_type_hints(owner)[part]
        field = fields[part]
        if i == len(parts) - 1:
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            return tp, field_docs(owner).get(part, ""), default
        owner = tp
    raise AssertionError("unreachable")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argparse_kwargs(flag: str, tp: Any, doc: str, positional: bool) -> dict:
    """How argparse reads `flag` for a field annotated `tp`: type, choices, action or nargs."""
    tp = _unwrap_optional(tp)
    kwargs: dict[str, Any] = {"help": doc.replace("%", "%%") or None}
    origin = typing.get_origin(tp)
    if tp is bool:
        if positional:
            raise TypeError(f"{flag}: a bool field cannot be a positional argument")
        # `--no-x` turns the field off, any other flag name turns it on.
        kwargs.update(action="store_const", const=not flag.startswith("--no-"))
        return kwargs
    if origin in (list, tuple):
        item = _scalar(flag, _unwrap_optional((typing.get_args(tp) or (str,))[0]))
        if positional:
            kwargs.update(type=item, nargs="*")
        elif item in (int, float):  # numbers: `--p 0.2 --p 0.5` or `--p 0.2,0.5`
            kwargs.update(type=_number_list(item), action=_Extend,
                          help=f"{kwargs['help'] or ''} (repeatable, or comma-separated)".strip())
        else:
            kwargs.update(type=item, action="append", help=f"{kwargs['help'] or ''} (repeatable)".strip())
        return kwargs
    kwargs["type"] = _scalar(flag, tp)
    if typing.get_origin(tp) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(tp))
    return kwargs


def _number_list(item: type):
    def parse(text: str) -> list:
        try:
            return [item(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {item.__name__}s") from None
    parse.__name__ = f"{item.__name__} list"
    return parse


class _Extend(argparse.Action):
    """Each use adds its (comma-separated) values to the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *values])


def _scalar(flag: str, tp: Any):
    if typing.get_origin(tp) is typing.Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        return kinds.pop() if len(kinds) == 1 else str
    if tp in (str, int, float):
        return tp
    if tp is Path:
        return str
    if tp is Any:
        return str
    raise TypeError(f"{flag}: a field of type {tp} cannot be a command-line flag; use --set")


def _add_flags(parser: argparse.ArgumentParser, cls: type, flags: Mapping[str, str],
               required: Iterable[str], prefix: str, enforce: bool) -> list[_Flag]:
    """Declare `flags`; `enforce`: argparse itself refuses a missing required flag."""
    required = set(required)
    unknown = required - set(flags)
    if unknown:
        raise TypeError(f"required flags not declared: {sorted(unknown)}")
    table = []
    for flag, dotted in flags.items():
        tp, doc, _ = _field(cls, dotted)
        positional = not flag.startswith("-")
        dest = f"{prefix}{dotted}" if not positional else flag
        kwargs = _argparse_kwargs(flag, tp, doc, positional)
        if positional:  # optional for argparse: a required one may come from --config (checked later)
            kwargs.setdefault("nargs", "?")
            parser.add_argument(flag, default=None, **kwargs)
        else:
            if "choices" not in kwargs and kwargs.get("action", "append") == "append":
                kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            parser.add_argument(flag, dest=dest, default=None, required=enforce and flag in required, **kwargs)
        table.append(_Flag(cls, flag, dotted, dest, flag in required))
    return table


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, flags: Mapping[str, str] | None = None, *,
                         required: Iterable[str] = (), config_required: bool = False,
                         config_help: str | None = None) -> None:
    """Add `--config`, `--set` and one argument per entry of `flags` (flag -> dotted field of `cls`).

    A flag without a leading dash is a positional argument. A required flag may also be given
    by `--config` or `--set`; `config_from_args` says which is missing."""
    parser.add_argument("--config", required=config_required, metavar="FILE",
                        help=config_help or f"YAML file (or shipped recipe name) with {cls.__name__} fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one {cls.__name__} field, e.g. --set section.key=value (repeatable; "
                             "explicit flags win over it)")
    table = _add_flags(parser, cls, flags or {}, required, prefix="config.", enforce=False)
    parser.set_defaults(**{_CONFIG_KEY: (cls, table)})


def _explicit(args: argparse.Namespace, table: list[_Flag]) -> dict[str, Any]:
    """The flags given on the command line (an empty positional list counts as not given)."""
    given = {f.dotted: getattr(args, f.dest) for f in table}
    return {k: v for k, v in given.items() if v is not None and v != []}


def given(args: argparse.Namespace, flag: str) -> Any:
    """The value of `flag` if the command line gave it, else None."""
    declared, table = getattr(args, _CONFIG_KEY, (None, []))
    tables = [table, *(getattr(args, _OPTIONS_KEY, None) or {}).values()]
    found = [f for t in tables for f in t if f.flag == flag]
    if not found:
        raise KeyError(f"{flag} was not declared on this parser")
    return _explicit(args, found).get(found[0].dotted)


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_from_args(cls: type[T], args: argparse.Namespace, base: dict | None = None) -> T:
    """The config of `add_config_arguments`: defaults < `base` < --config < --set < explicit flags.

    `base` is a command's preset (the demo's --quick sizes). Raises ConfigError naming the file,
    the key or the missing flag."""
    declared, table = getattr(args, _CONFIG_KEY, (None, []))
    if declared is not cls:
        raise TypeError(f"add_config_arguments was not called with {cls.__name__} on this parser")
    data, source = layered_data(cls, args.config, list(args.set), _explicit(args, table), base)
    check_keys(cls, data, source)
    for f in table:
        if f.required and _lookup(data, f.dotted) in (None, "", []) and _field(cls, f.dotted)[2] in (None, "", []):
            raise ConfigError(f"{f.flag} is required (or {f.dotted} in the --config file or --set {f.dotted}=...)")
    return from_dict(cls, data, source)


def add_options(parser: argparse.ArgumentParser, cls: type, flags: Mapping[str, str], *,
                required: Iterable[str] = ()) -> None:
    """Flags for the fields of an invocation-options dataclass `cls` (not read from --config or --set)."""
    table = _add_flags(parser, cls, flags, required, prefix=f"{cls.__name__}.", enforce=True)
    known = dict(parser.get_default(_OPTIONS_KEY) or {})
    known[cls] = table
    parser.set_defaults(**{_OPTIONS_KEY: known})


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The `add_options` dataclass: its defaults, overridden by the flags given."""
    table = (getattr(args, _OPTIONS_KEY, None) or {}).get(cls)
    if table is None:
        raise TypeError(f"add_options was not called with {cls.__name__} on this parser")
    return from_dict(cls, _nest(_explicit(args, table)), "command-line flags")


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def declared_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[type, str, str]]:
    """Flag -> (dataclass, dotted field, docstring) for every flag this module declared on `parser`."""
    config = parser.get_default(_CONFIG_KEY)
    tables = ([config[1]] if config else []) + list((parser.get_default(_OPTIONS_KEY) or {}).values())
    return {f.flag: (f.cls, f.dotted, _field(f.cls, f.dotted)[1]) for table in tables for f in table}


def config_class(parser: argparse.ArgumentParser) -> type | None:
    """The dataclass `add_config_arguments` declared on `parser` (None if it was not called)."""
    config = parser.get_default(_CONFIG_KEY)
    return config[0] if config else None
