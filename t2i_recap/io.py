"""File-system helpers every package shares: atomic writes, safe keys, shard patterns."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

_UMASK = os.umask(0)
os.umask(_UMASK)
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


class UnsafeKeyError(ValueError):
    """A sample key that could name a path outside the output folder."""


def check_key(key: str) -> str:
    """Return `key` if it is safe to use as a file-name stem, else raise `UnsafeKeyError`.

    Keys come from user data (webdataset member names, parquet columns); a key such as
    `../../etc/x` or `a/b` must never choose where we write.
    """
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise UnsafeKeyError(f"unsafe sample key {key!r}: keys must match {_KEY_RE.pattern} and hold no '..'")
    return key


def check_model_source(name_or_path: str | Path, what: str = "model") -> str:
    """Return `name_or_path`, or raise FileNotFoundError naming it when it is a local path that does not exist.

    A hub id is `name` or `org/name`; anything absolute, starting with `.` or `~`, or with more than
    one `/` is a path. Without this check from_pretrained reports a missing folder as "Repo id must be
    in the form 'repo_name' ..." or as a network error, neither of which names the real problem.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return text
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"{what} {text!r}: no such file or folder")
    return text


def safe_join(root: str | Path, *parts: str) -> Path:
    """Join `parts` under `root` and refuse any result that leaves `root`."""
    root_path = Path(root).resolve()
    out = root_path.joinpath(*parts).resolve()
    if out != root_path and root_path not in out.parents:
        raise UnsafeKeyError(f"path {'/'.join(parts)!r} leaves the output folder {root_path}")
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    A crash leaves either the old file or the new one, never a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get normal modes
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def expand_shards(pattern: str | Path, suffixes: tuple[str, ...] = (".tar",)) -> list[Path]:
    """Resolve SHARDS: a folder (its files with `suffixes`), a glob, or a brace pattern.

    `data/{00000..00009}.tar` expands like img2dataset/webdataset patterns. Raises
    FileNotFoundError naming the pattern when nothing matches or a named shard is missing.
    """
    text = str(pattern)
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if not found:
            raise FileNotFoundError(f"{text}: folder holds no {'/'.join(suffixes)} shards")
        return found
    out: list[Path] = []
    for item in braceexpand(text):
        if glob.has_magic(item):
            out.extend(Path(p) for p in sorted(glob.glob(item)))
        elif Path(item).is_file():
            out.append(Path(item))
        else:
            raise FileNotFoundError(f"{text}: shard {item} does not exist")
    if not out:
        raise FileNotFoundError(f"{text}: no shard matches")
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]
