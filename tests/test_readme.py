"""The README's commands, as written (the idea of Lightning-AI/litgpt's tests/test_readme.py): every
`t2i-recap` line of its bash blocks parses with its command's own parser, and the quick-start
commands that are sized to run here (`--quick`) run end to end from a fresh folder."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_recap.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def bash_commands(section: str | None = None) -> list[list[str]]:
    """The `t2i-recap` command lines of README.md's ```bash blocks (of one `## ` section if named)."""
    text = README.read_text(encoding="utf-8")
    if section is not None:
        parts = re.split(r"^## ", text, flags=re.M)
        matches = [p for p in parts if p.startswith(section)]
        assert matches, f"README.md has no section '## {section}'"
        text = matches[0]
    commands = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "t2i-recap":
                commands.append(words)
    return commands


def _module_and_args(words: list[str]):
    for n in (2, 1):
        if tuple(words[1:1 + n]) in COMMANDS:
            return importlib.import_module(COMMANDS[tuple(words[1:1 + n])][0]), words[1 + n:]
    raise AssertionError(f"README.md: {' '.join(words)}: no such command")


def test_quick_start_has_the_demo_at_both_sizes():
    commands = bash_commands("Quick start")
    assert len(commands) >= 2 and all(c[1] == "demo" for c in commands)
    assert any("--quick" in c for c in commands) and any("--quick" not in c for c in commands)


@pytest.mark.parametrize("words", bash_commands(), ids=lambda w: " ".join(w)[:70])
def test_every_readme_command_parses(words):
    module, args = _module_and_args(words)
    module.build_parser().parse_args(args)  # argparse exits (status 2) on an unknown or malformed flag


def _value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


@pytest.mark.slow
@pytest.mark.parametrize("words", [c for c in bash_commands("Quick start") if "--quick" in c],
                         ids=lambda w: " ".join(w))
def test_quick_start_runs_as_written(words, tmp_path):
    """The quick demo from an empty folder, through the installed console script (a few minutes on 2 cores)."""
    exe = shutil.which("t2i-recap") or sys.executable
    argv = [exe, *words[1:]] if exe.endswith("t2i-recap") else [exe, "-m", "t2i_recap", *words[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / _value(words, "--out")
    assert (out / "report" / "compare.md").is_file() and (out / "demo_config.yaml").is_file()
    assert "Overall shapes-oracle alignment" in done.stdout
