"""The shipped recipes (configs/ in the repository, `t2i_recap.configs` once installed) and the one
resolver every `--config` goes through.

Which root config class a YAML file belongs to is decided by its folder: configs/train/*.yaml ->
TrainConfig, configs/caption/<name>.yaml -> the captioner's run or fine-tune config,
configs/eval/*.yaml -> EvalConfig, configs/assets/*.yaml -> AssetsConfig.

`resolve_config(text, kind)`: a path that exists always wins; a bare name (no slash, no .yaml)
is looked up among the shipped recipes, in the command's own kind first; a missing
`configs/<kind>/<file>.yaml` path that the package ships is read from the package (so the
commands in the README work after `pip install`, from any folder).
"""

from __future__ import annotations

import importlib
import importlib.resources
from pathlib import Path

from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)


class RecipeError(ValueError):
    """A --config names no file and no shipped recipe, or a name that several recipes share."""

# folder -> (file-name prefix -> "module:Class"); the longest matching prefix wins, "" is the default.
REGISTRY: dict[str, dict[str, str]] = {
    "train": {"": "t2i_recap.train_config:TrainConfig"},
    "caption": {"": "t2i_recap.captioner.run:CaptionRunConfig",
                "finetune": "t2i_recap.captioner.finetune_config:FinetuneConfig"},
    "eval": {"": "t2i_recap.evaluate.run:EvalConfig"},
    "assets": {"": "t2i_recap.shapes.assets:AssetsConfig"},
    "clip": {"": "t2i_recap.clip.config:ClipTrainConfig"},
}
SUFFIXES = (".yaml", ".yml")


def config_class_for(path: str | Path) -> type:
    path = Path(path)
    folder = path.parent.name
    if folder not in REGISTRY:
        raise KeyError(f"{path}: configs must live in one of configs/{{{','.join(REGISTRY)}}}/")
    table = REGISTRY[folder]
    prefix = max((p for p in table if path.stem.startswith(p)), key=len)
    module, name = table[prefix].split(":")
    return getattr(importlib.import_module(module), name)


def kind_of(cls: type) -> str | None:
    """The configs/ folder whose recipes build `cls` (None for a class no folder holds)."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    return next((kind for kind, table in REGISTRY.items() if target in table.values()), None)


def shipped_root() -> Path:
    """The shipped configs/ folder: package data of `t2i_recap.configs` (pyproject.toml's
    package-dir maps it onto the repository's configs/, so a checkout and a wheel agree)."""
    root = importlib.resources.files("t2i_recap.configs")
    path = Path(str(root))
    if not path.is_dir():  # a zipped install has no folder to hand to the YAML reader
        raise RecipeError(f"the shipped configs are not a folder on disk ({root}); install t2i-recap unzipped")
    return path


def shipped_recipes() -> dict[str, list[Path]]:
    """Recipe name -> its files across configs/{train,caption,eval,assets}/ (a name may repeat)."""
    out: dict[str, list[Path]] = {}
    for kind in REGISTRY:
        folder = shipped_root() / kind
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix in SUFFIXES:
                out.setdefault(path.stem, []).append(path)
    return out


def _is_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith(SUFFIXES)


def _by_name(name: str, kind: str | None) -> Path:
    recipes = shipped_recipes()
    found = recipes.get(name, [])
    if kind is not None and len(found) > 1:
        found = [p for p in found if p.parent.name == kind] or found
    if not found:
        names = ", ".join(f"{p.parent.name}/{n}" for n, ps in sorted(recipes.items()) for p in ps)
        raise RecipeError(f"--config {name}: no such file and no shipped recipe of that name (available: {names})")
    if len(found) > 1:
        listed = ", ".join(f"configs/{p.parent.name}/{p.name}" for p in found)
        raise RecipeError(f"--config {name}: ambiguous recipe name, candidates: {listed}; pass one of these paths")
    if kind is not None and found[0].parent.name != kind:
        log.warning("--config %s: the shipped recipe is a %s config, not %s", name, found[0].parent.name, kind)
    return found[0]


def _shipped_path(path: Path) -> Path | None:
    """`configs/<kind>/<file>` (relative, absent here) as the shipped file, if the package has it."""
    parts = path.parts
    if path.is_absolute() or len(parts) < 3 or parts[-3] != "configs" or parts[-2] not in REGISTRY:
        return None
    shipped = shipped_root() / parts[-2] / parts[-1]
    return shipped if shipped.is_file() else None


def resolve_config(text: str | Path, kind: str | None = None) -> Path:
    """The YAML file `--config text` means for a command whose configs live in configs/<kind>/."""
    path = Path(text)
    if path.is_file():
        return path
    if isinstance(text, str) and _is_name(text) and not path.exists():
        return _by_name(text, kind)
    shipped = _shipped_path(path)
    if shipped is not None:
        log.info("--config %s: not in %s; reading the recipe shipped with t2i-recap (%s)", text, Path.cwd(), shipped)
        return shipped
    raise RecipeError(f"{path}: config file not found")
