"""Optional parts of t2i-recap: the module a command needs, or an error that names the pip extra.

pyproject.toml's [project.optional-dependencies] declares the extras; `require` is the one place a
command asks for one, so a missing package reads "pip install 't2i-recap[caption]'" instead of a
bare ModuleNotFoundError deep inside a run.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class MissingExtraError(ImportError):
    """A package that only one extra of t2i-recap installs is missing."""


def available(module: str) -> bool:
    """True when `module` (a top-level package name) can be imported."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, extra: str, why: str = "") -> ModuleType:
    """Import `module`, or raise MissingExtraError naming the extra that installs it."""
    if not available(module):
        reason = f" ({why})" if why else ""
        raise MissingExtraError(f"{module} is not installed{reason}: pip install 't2i-recap[{extra}]'")
    return importlib.import_module(module)
