"""The wheel installs exactly one top-level package, and every package folder is in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, cwd=out,
    )
    (wheel,) = out.glob("t2i_recap-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_has_no_top_level_evaluate_or_captioner(wheel_names):
    tops = {n.split("/", 1)[0] for n in wheel_names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert tops == {"t2i_recap"}, tops
    assert "t2i_recap/evaluate/__init__.py" in wheel_names
    assert "t2i_recap/captioner/__init__.py" in wheel_names


def test_every_package_folder_is_in_the_wheel(wheel_names):
    mapping = {"t2i_recap": "t2i_recap", "captioner": "t2i_recap/captioner", "evaluate": "t2i_recap/evaluate"}
    for src, dst in mapping.items():
        for init in (REPO / src).rglob("__init__.py"):
            rel = init.relative_to(REPO / src).as_posix()
            assert f"{dst}/{rel}" in wheel_names, f"{src}/{rel} is not packaged: add it to pyproject.toml"
        for module in (REPO / src).rglob("*.py"):
            rel = module.relative_to(REPO / src).as_posix()
            assert f"{dst}/{rel}" in wheel_names, f"{src}/{rel} is not packaged"


def test_prebuilt_assets_are_in_the_wheel(wheel_names):
    """A pip-installed package (not only a checkout) finds the shapes world's prebuilt parts."""
    prebuilt = REPO / "t2i_recap" / "shapes" / "prebuilt"
    files = sorted(p.relative_to(REPO).as_posix() for p in prebuilt.rglob("*") if p.is_file())
    assert any(f.endswith("model.safetensors") for f in files)
    missing = [f for f in files if f not in wheel_names]
    assert not missing, f"not packaged: {missing} (pyproject.toml package-data)"


def test_console_script_and_python_m():
    # The script pip installed beside this interpreter (PATH may hold another environment's).
    script = Path(sys.executable).parent / "t2i-recap"
    assert script.exists(), f"no console script at {script}: is the package installed (make install)?"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for words in ("shapes make", "caption run", "eval compare", "demo", "train", "export"):
        assert words in out
    out = subprocess.run([sys.executable, "-m", "t2i_recap", "--help"], capture_output=True, text=True, check=True)
    assert "shapes assets" in out.stdout
    bad = subprocess.run([str(script), "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_every_command_module_has_main():
    import importlib

    from t2i_recap.cli import COMMANDS

    missing = []
    for words, (module, _) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing.append(f"{' '.join(words)}: {exc}")
            continue
        assert callable(getattr(mod, "main", None)), f"{module} has no main(argv)"
    assert not missing, missing


def test_recipes_are_in_the_wheel(wheel_names):
    """configs/ ships as t2i_recap/configs/, so `--config NAME` works after pip install."""
    recipes = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert "train/recap_dit_b4_clip.yaml" in recipes
    missing = [r for r in recipes if f"t2i_recap/configs/{r}" not in wheel_names]
    assert not missing, f"recipes not packaged: {missing} (pyproject.toml package-data)"


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_quick_demo(tmp_path):
    """Build the wheel, install it (and torch's CPU build) into a venv that cannot see this checkout or
    its editable install, and run `t2i-recap demo --quick` from an empty folder."""
    import time

    start = time.monotonic()
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("t2i_recap-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no --system-site-packages
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run([str(py), "-c", "import t2i_recap; print(t2i_recap.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where, where  # the wheel, not this checkout
    run = subprocess.run([str(venv / "bin" / "t2i-recap"), "demo", "--quick", "--out", "X"], cwd=empty, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Overall shapes-oracle alignment" in run.stdout, run.stdout[-2000:]  # demo.summarize's closing summary
    report = empty / "X" / "report" / "compare.json"
    assert report.is_file(), sorted(p.name for p in (empty / "X").iterdir())
    assert json.loads(report.read_text())["rows"]
    # matplotlib is the [caption] extra: without it the stats stage records that the plot was not drawn
    stats = json.loads((empty / "X" / "caption_stats" / "stats.json").read_text())
    assert "t2i-recap[caption]" in stats["plot_skipped"]
    print(f"wheel build + venv + install + quick demo: {time.monotonic() - start:.0f} s")


def _imported_modules() -> set[str]:
    import ast

    found = set()
    for folder in ("t2i_recap", "captioner", "evaluate"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"t2i_recap", "__future__"}


def _declared() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_imported_package_is_declared():
    """A module the code imports comes from a distribution pyproject.toml names (core or an extra)."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_imported_modules()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "braceexpand" in _imported_modules() and "peft" in _imported_modules()  # the scan sees real imports


def test_a_missing_extra_is_named():
    from t2i_recap.extras import MissingExtraError, require

    assert require("yaml", extra="caption").safe_load("a: 1") == {"a": 1}
    with pytest.raises(MissingExtraError, match=r"no_such_module_xyz is not installed \(LoRA\): pip install 't2i-recap\[caption\]'"):
        require("no_such_module_xyz", extra="caption", why="LoRA")
