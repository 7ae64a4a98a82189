"""Typed configuration: dataclasses are the schema, YAML files and `--set` only override them.

Each component owns a small dataclass (torchtitan style) with a docstring per field and checks
in `__post_init__`. `load_config` builds the root dataclass from defaults, then a YAML file, then
`section.key=value` overrides, and fails with a `ConfigError` naming the key and the file on an
unknown key or a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from t2i_recap.config_registry import RecipeError, kind_of, resolve_config

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        # YAML 1.1 reads a bare no/off/yes/on as a bool: `--set trainer.mixed_precision=no` means "no".
        if isinstance(value, bool):
            words = [w for w in (("no", "off", "false") if not value else ("yes", "on", "true")) if w in args]
            value = words[0] if words else value
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {_type_name(tp)}, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string: YAML 1.1's float rule
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _init_values(obj: Any) -> dict:
    """A dataclass instance's init fields as a mapping, nested sections as mappings too."""
    return {f.name: _init_values(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
            for f in dataclasses.fields(obj) if f.init}


def _section_default(field: dataclasses.Field) -> dict | None:
    """The values of a section's default instance when its default_factory sets some (`lambda:
    MixingConfig(cfg_dropout=0.0)`), so a partial mapping overrides those, not the class defaults."""
    if field.default_factory is dataclasses.MISSING:
        return None
    default = field.default_factory()
    return _init_values(default) if dataclasses.is_dataclass(default) else None


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}.{key}: unknown key (known keys: {known})".lstrip("."))
        base = _section_default(fields[key]) if isinstance(value, dict) else None
        if base is not None and dataclasses.is_dataclass(hints[key]):
            value = _merge(base, value)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}".lstrip("."))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def check_keys(cls: type, data: dict, source: str = "<dict>", where: str = "") -> None:
    """Raise the ConfigError `from_dict` would for the first unknown key, without building anything."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        dotted = f"{where}.{key}".lstrip(".")
        if key not in fields:
            raise ConfigError(f"{source}: {dotted}: unknown key (known keys: {', '.join(sorted(fields))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            check_keys(tp, value, source, dotted)


def from_dict(cls: type[T], data: dict | None, source: str = "<dict>") -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; errors name `source` and the key."""
    try:
        return _build(cls, data or {}, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (so 1e-4, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {dotted!r}")
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def layered_data(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                 flags: dict[str, Any] | None = None, base: dict | None = None) -> tuple[dict, str]:
    """The mapping `load_config` builds `cls` from, and a name for it that errors quote.

    Layers, later ones winning: `base` (a command's preset over the defaults, e.g. the demo's
    --quick sizes), the YAML file at `path`, the `--set` strings, then `flags` (dotted key ->
    value, the command's explicit flags, already typed)."""
    data: dict = dict(base or {})
    if path is not None:
        try:
            path = resolve_config(path, kind_of(cls))
        except RecipeError as exc:
            raise ConfigError(str(exc)) from None
        file_data = load_yaml(path)
        from_dict(cls, file_data, str(path))  # errors name the file before --set mixes in
        data = _merge(data, file_data)
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    for dotted, value in (flags or {}).items():
        node: dict = {}
        parts = dotted.split(".")
        leaf = node
        for part in parts[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[parts[-1]] = value
        data = _merge(data, node)
    source = str(path or "<defaults>")
    if overrides:
        source += f" with --set {' '.join(overrides)}"
    if flags:
        source += f" with flags {', '.join(f'{k}={v!r}' for k, v in flags.items())}"
    return data, source


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> T:
    """Defaults of `cls`, overridden by the YAML file at `path`, then by `--set` strings, then by
    `flags` (dotted key -> value; see `layered_data`).

    `path` is a file or a shipped recipe's name (`recap_dit_b4_clip`), found by
    `config_registry.resolve_config` in the folder of `cls`'s kind."""
    data, source = layered_data(cls, path, overrides, flags)
    return from_dict(cls, data, source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically), next to a run or report."""
    from t2i_recap.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
