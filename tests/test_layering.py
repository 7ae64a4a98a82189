"""The packages depend one way: core <- captioner <- evaluate, and only the CLI and the demo reach across all.

Every import in the three source folders is read with `ast` (function-level imports included, since
a lazy import is still a dependency), mapped to the file it names, and checked against the layers:

  core       t2i_recap/ (training, shapes world, shared helpers: images, shards, sidecars, identity)
  captioner  captioner/ -> may import the core
  evaluate   evaluate/  -> may import the core and the captioner's backend and prompts
  top        t2i_recap/cli.py, t2i_recap/demo.py, t2i_recap/__main__.py -> anything

and the file-level import graph has no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"t2i_recap": ROOT / "t2i_recap", "t2i_recap.captioner": ROOT / "captioner",
           "t2i_recap.evaluate": ROOT / "evaluate"}
TOP = {"t2i_recap.cli", "t2i_recap.demo", "t2i_recap.__main__"}
# The backend runs a VLM (VQA scoring); prompts word the recaptioned-prompt protocol as the captioner does.
EVALUATE_MAY_USE = ("t2i_recap.captioner.backend", "t2i_recap.captioner.prompts")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            mods[name] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module a dotted import names (the longest known prefix), or None if not ours."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    is_pkg = MODULES[module].name == "__init__.py"
    base = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> str:
    if module in TOP:
        return "top"
    if module.startswith("t2i_recap.captioner"):
        return "captioner"
    if module.startswith("t2i_recap.evaluate"):
        return "evaluate"
    return "core"


def _allowed(src: str, dst: str) -> bool:
    a, b = _layer(src), _layer(dst)
    if a == "top" or b == "core":
        return True
    if a == b:
        return True
    if a == "evaluate" and b == "captioner":
        return dst.startswith(EVALUATE_MAY_USE)
    return False


def test_the_scan_sees_the_packages():
    # A scan that found nothing would pass everything below.
    assert "t2i_recap.trainer" in MODULES and "t2i_recap.captioner.run" in MODULES
    assert "t2i_recap.evaluate.run" in MODULES
    assert "t2i_recap.trainer" in GRAPH["t2i_recap.train"]


@pytest.mark.parametrize("layer", ["core", "captioner", "evaluate"])
def test_layers_point_one_way(layer):
    bad = sorted(f"{src} imports {dst}" for src, dsts in GRAPH.items() if _layer(src) == layer
                 for dst in dsts if not _allowed(src, dst))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles_between_files():
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
