"""One CLI mechanism (t2i_recap/cli_config.py) for every command of `t2i-recap`: each flag is a field
of a config dataclass with its docstring as `--help` text; `--config FILE` < `--set KEY=VALUE` <
explicit flags; an unknown `--set` key is an error naming the key; the flags the docs show exist."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest
import yaml

from t2i_recap.cli import COMMANDS
from t2i_recap.cli_config import (_field, _unwrap_optional, add_config_arguments, config_class, config_from_args,
                                  declared_flags, field_docs)
from t2i_recap.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted({module for module, _ in COMMANDS.values()})
OWN_FLAGS = {"-h", "--help", "--config", "--set"}
# A field set by file, --set and flag where the command has no scalar config flag of its own.
FIELD_FOR = {"t2i_recap.train": "mixing.p", "t2i_recap.prepare": "mixing.p", "t2i_recap.clip.train": "mixing.p",
             "t2i_recap.lora": "lr"}


def _parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("module", MODULES)
def test_help_shows_every_flag_with_its_field_docstring(module, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag: no wrapping inside the docstring text
    parser = _parser(module)
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0
    shown = _flat(capsys.readouterr().out)
    declared = declared_flags(parser)
    assert "--config" in shown and "--set" in shown and config_class(parser) is not None
    hand_written = [a.option_strings or [a.dest] for a in parser._actions
                    if not set(a.option_strings) & OWN_FLAGS and (a.option_strings or [a.dest])[0] not in declared]
    assert not hand_written, f"{module}: flags not declared from a config dataclass: {hand_written}"
    for flag, (cls, dotted, doc) in declared.items():
        assert doc, f"{module} {flag}: {cls.__name__}.{dotted} has no docstring"
        assert flag in shown
        assert _flat(doc) in shown.replace("%%", "%"), f"{module} {flag}: help does not show {doc!r}"


def _value(tp, n: int):
    """The n-th (1, 2, 3) test value of annotation `tp`."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, tuple):
        return [_value(typing.get_args(tp)[0], n)]
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return choices[n % len(choices)]
    return {int: 2 + n, float: 0.1 * n, str: f"value-{n}"}[tp]


def _argv(flag: str, value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not flag.startswith("-"):
        return [str(v) for v in values]
    return [part for v in values for part in (flag, str(v))]


def _required_data(parser) -> dict:
    """The required flags' fields with a valid value each, as a nested mapping (a --config file)."""
    data: dict = {}
    for f in parser.get_default("_cli_config")[1]:
        if f.required:
            node = data
            parts = f.dotted.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = _value(_field(f.cls, f.dotted)[0], 1)
    return data


def _required_options(parser, tmp_path) -> list[str]:
    """Required invocation options (--out, --pipeline), each given a folder under tmp_path."""
    return [part for a in parser._actions if a.required and a.option_strings[0] not in OWN_FLAGS
            for part in (a.option_strings[0], str(tmp_path / "o"))]


def _probe(module: str, parser) -> tuple[str | None, str]:
    """(flag or None, dotted field) the precedence test sets three ways."""
    if module in FIELD_FOR:
        return None, FIELD_FOR[module]
    table = parser.get_default("_cli_config")[1]
    for f in table:
        tp = _unwrap_optional(_field(f.cls, f.dotted)[0])
        if tp is not bool:
            return f.flag, f.dotted
    raise AssertionError(f"{module}: no flag to probe; add it to FIELD_FOR")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("module", MODULES)
def test_config_file_then_set_then_flag(module, tmp_path):
    parser = _parser(module)
    cls = config_class(parser)
    flag, dotted = _probe(module, parser)
    tp = _field(cls, dotted)[0]
    data = _required_data(parser)
    node = data
    for part in dotted.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[dotted.split(".")[-1]] = _value(tp, 1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    base = ["--config", str(path), *_required_options(parser, tmp_path)]

    def parsed(*extra):
        return _get(config_from_args(cls, parser.parse_args(base + list(extra))), dotted)

    set_value = yaml.safe_dump(_value(tp, 2), default_flow_style=True).strip().removesuffix("...").strip()
    assert parsed() == _value(tp, 1)
    assert parsed("--set", f"{dotted}={set_value}") == _value(tp, 2)
    if flag is not None:
        assert parsed("--set", f"{dotted}={set_value}", *_argv(flag, _value(tp, 3))) == _value(tp, 3)


@pytest.mark.parametrize("module", MODULES)
def test_unknown_set_key_is_an_error_naming_it(module, tmp_path, capsys):
    parser = _parser(module)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_required_data(parser)))
    argv = ["--config", str(path), "--set", "no_such_key=1", *_required_options(parser, tmp_path)]
    with pytest.raises(ConfigError, match="no_such_key: unknown key"):
        config_from_args(config_class(parser), parser.parse_args(argv))
    try:  # argparse's error (exit 2) or the command's own message and exit code 2
        code = importlib.import_module(module).main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "no_such_key" in capsys.readouterr().err


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command words, flags) for every `t2i-recap ...` command line in the docs."""
    files = [REPO / "README.md", REPO / "captioner" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    words = sorted({" ".join(w) for w in COMMANDS}, key=len, reverse=True)
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            for match in re.finditer(r"t2i-recap ((?:[a-z]+)(?: [a-z]+)?)", line):
                name = next((w for w in words if (match.group(1) + " ").startswith(w + " ")), None)
                if name is None:
                    continue
                rest = re.split(r"`|#|\||;|&&", line[match.end():])[0]
                flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)
                found.append((f"{path.relative_to(REPO)}: {line.strip()[:80]}", name, flags))
    return found


def test_every_flag_the_docs_show_exists():
    modules = {" ".join(words): module for words, (module, _) in COMMANDS.items()}
    documented = _documented_commands()
    assert len(documented) > 20  # the README's commands were found
    missing = []
    for where, name, flags in documented:
        known = set(_parser(modules[name])._option_string_actions)
        missing += [f"{where}: {flag}" for flag in flags if flag not in known]
    assert not missing, "flags the docs show that the command does not take:\n" + "\n".join(missing)


# ---- the helper itself --------------------------------------------------------------------------

@dataclasses.dataclass
class _Inner:
    rate: float = 0.5
    """A rate with 100% in it."""


@dataclasses.dataclass
class _Outer:
    name: str = ""
    """The name.

    Second line."""
    mode: typing.Literal["a", "b"] = "a"
    """Which mode."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """Tags."""
    progress: bool = True
    """Show progress."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """Weights."""
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    """A section."""


def _outer_parser():
    p = argparse.ArgumentParser(prog="x")
    add_config_arguments(p, _Outer, {"--name": "name", "--mode": "mode", "--tag": "tags", "--no-progress": "progress",
                                     "--rate": "inner.rate", "--w": "weights"}, required=("--name",))
    return p


def test_helper_types_choices_lists_bools_and_nested_fields():
    p = _outer_parser()
    cfg = config_from_args(_Outer, p.parse_args(["--name", "n", "--mode", "b", "--tag", "x", "--tag", "y",
                                                 "--no-progress", "--rate", "0.25", "--w", "1,2.5", "--w", "3"]))
    assert cfg == _Outer(name="n", mode="b", tags=["x", "y"], progress=False, weights=[1.0, 2.5, 3.0],
                         inner=_Inner(0.25))
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    assert field_docs(_Outer)["name"] == "The name. Second line."
    assert "100%" in p.format_help()  # a % in a docstring is not an argparse format


def test_helper_required_flag_may_come_from_the_file(tmp_path):
    p = _outer_parser()
    with pytest.raises(ConfigError, match="--name is required"):
        config_from_args(_Outer, p.parse_args([]))
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\ninner:\n  rate: 0.1\n")
    cfg = config_from_args(_Outer, p.parse_args(["--config", str(path), "--set", "inner.rate=0.2"]))
    assert cfg.name == "from-file" and cfg.inner.rate == 0.2


def test_helper_refuses_undeclared_fields_and_unflaggable_types():
    with pytest.raises(TypeError, match="no field 'nope'"):
        add_config_arguments(argparse.ArgumentParser(), _Outer, {"--nope": "nope"})
    with pytest.raises(TypeError, match="cannot be a command-line flag"):
        add_config_arguments(argparse.ArgumentParser(), _Outer, {"--inner": "inner"})


def test_a_partial_section_keeps_the_defaults_its_factory_sets(tmp_path):
    from t2i_recap.clip.config import ClipTrainConfig
    from t2i_recap.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("mixing:\n  p: 0.3\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(ClipTrainConfig, path)  # the section defaults: cfg_dropout 0, weight decay 0.2
    assert cfg.mixing.p == 0.3 and cfg.mixing.cfg_dropout == 0.0
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.2


def test_caption_run_template_alone_means_a_custom_prompt():
    from t2i_recap.captioner import run

    def prompt(*argv):
        return run.config_from_args(run.build_parser().parse_args(["--input", "i", "--out", "o", "--model", "m", *argv]))

    assert prompt("--template", "describe {org_caption}").prompt == "custom"
    assert prompt().prompt == "recap"
    assert prompt("--template", "x {org_caption}", "--prompt", "conditioned").prompt == "conditioned"
    assert prompt("--template", "x {org_caption}", "--set", "prompt=recap").prompt == "recap"  # --set wins over it
