"""Metrics load local weights only; a missing file is an error that names it.

Evaluation runs where there is no model hub (CI, air-gapped clusters), and a metric that
silently downloads its network gives numbers nobody can trace. So each metric's model is a local
path, checked here before any library gets a chance to reach for the network.
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class MissingWeightsError(FileNotFoundError):
    """A metric's local model or weights file is missing."""


def require_model_dir(path: str | Path | None, flag: str, what: str,
                      extra: tuple[str, ...] = ()) -> Path:
    """Check that `path` is a `save_pretrained` folder (config + weights + `extra` files)."""
    if path is None:
        raise MissingWeightsError(f"{what} needs a local model folder: pass {flag} PATH")
    path = Path(path)
    if not path.is_dir():
        raise MissingWeightsError(f"{what} ({flag}): model folder {path} does not exist "
                                  "(metrics load only local weights, never from a hub)")
    for name in ("config.json", *extra):
        if not (path / name).is_file():
            raise MissingWeightsError(f"{what} ({flag}): {path / name} does not exist")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise MissingWeightsError(f"{what} ({flag}): no weights in {path}: expected {path / WEIGHT_FILES[0]} "
                                  f"(or {', '.join(WEIGHT_FILES[1:])})")
    return path


def require_file(path: str | Path | None, flag: str, what: str) -> Path:
    if path is None:
        raise MissingWeightsError(f"{what} needs a local weights file: pass {flag} PATH")
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"{what} ({flag}): weights file {path} does not exist "
                                  "(metrics load only local weights, never from a hub)")
    return path


def folder_sha256(path: str | Path) -> str:
    """Content hash of every file under `path` (names and bytes): a model's identity in reports."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
