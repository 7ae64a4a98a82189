"""The wheel installs exactly one top-level package, and every package folder is in it."""

from __future__ import annotations

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
