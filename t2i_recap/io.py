"""File-system helpers every package shares: atomic writes, output folders, safe keys, shard patterns."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from braceexpand import braceexpand

from t2i_recap import storage

_UMASK = os.umask(0)
os.umask(_UMASK)
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
# Written into every folder this project creates to be replaced later (an export, a fine-tuned
# captioner, a shapes asset part): `--overwrite` removes only folders that hold it.
OUTPUT_MARKER = ".t2i-recap-output.json"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # EDQUOT: a full quota


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


class DiskFullError(OSError):
    """The device ran out of space; the partial output was removed and the old one (if any) is intact."""


class RefusedOverwriteError(FileExistsError):
    """An existing path that this project may not replace (not its output, or it holds a run)."""


def file_mode() -> int:
    """The mode `open()` gives a new file under the process umask (0644 under umask 022)."""
    return 0o666 & ~_UMASK


def normalize_modes(root: str | Path) -> None:
    """Give every file under `root` the umask mode and every folder the umask folder mode.

    safetensors writes weights through a temp file that is always 0600 (safetensors/safetensors#782)
    and mkstemp/mkdtemp make 0600/0700: without this, weights and folders are private while the
    JSON beside them is world-readable, and another user (a serving account, a container) fails.
    """
    os.chmod(root, 0o777 & ~_UMASK)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~_UMASK)
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode())


def _disk_full(exc: OSError, target: Path) -> DiskFullError:
    where = exc.filename or target
    return DiskFullError(errno.ENOSPC, f"no space left on the device writing {where}; the partial output was "
                                       f"removed and {target} is unchanged: free space and run again")


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
        os.chmod(tmp_path, file_mode())  # mkstemp makes 0600 files; outputs get normal modes
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` so that `path` holds the old bytes or all the new ones; a URL gets one whole PUT."""
    if storage.is_url(path):
        storage.write_bytes(str(path), data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- replaceable output folders


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark `folder` as a `kind` output of this project, which a later `--overwrite` may replace."""
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"written_by": "t2i-recap", "kind": kind}) + "\n")


def read_marker(folder: str | Path) -> str | None:
    """The kind in `folder`'s marker, or None when it has none (or not ours)."""
    try:
        data = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("written_by") == "t2i-recap" else None


def _holds_run(folder: Path) -> Path | None:
    """A training run or checkpoint inside `folder` (a `checkpoints` folder or a `state.json`), if any."""
    for root, dirs, files in os.walk(folder):
        if "checkpoints" in dirs:
            return Path(root) / "checkpoints"
        if "state.json" in files:
            return Path(root) / "state.json"
    return None


def check_replaceable(out: str | Path, *, kind: str, overwrite: bool, protect: Iterable[str | Path] = (),
                      owned: bool = False) -> None:
    """Raise unless `out` may be written: it is absent, or `overwrite` is set and it is a folder this
    project wrote as a `kind` output (its marker says so, or `owned`: the caller's own record names it)
    that neither is nor contains any `protect` path, a training run or a checkpoint."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder (made ahead by the user): nothing to lose
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    resolved = out.resolve()
    for path in protect:
        path = Path(path).resolve()
        if path == resolved or resolved in path.parents:
            raise RefusedOverwriteError(f"refusing to replace {out}: it is or contains {path}, an input of this command")
    if out.is_symlink() or not out.is_dir():
        raise RefusedOverwriteError(f"refusing to replace {out}: not a folder t2i-recap wrote (a file or a link)")
    if not owned and read_marker(out) != kind:
        raise RefusedOverwriteError(
            f"refusing to replace {out}: it has no {OUTPUT_MARKER} marker of a t2i-recap {kind}, so it may hold "
            "your own files; remove it yourself or choose another output path")
    run = _holds_run(out)
    if run is not None:
        raise RefusedOverwriteError(f"refusing to replace {out}: it holds a training run or checkpoint ({run})")


def replace_dir(tmp: str | Path, out: str | Path, *, kind: str, overwrite: bool,
                protect: Iterable[str | Path] = (), owned: bool = False) -> Path:
    """Rename the finished folder `tmp` onto `out`, replacing `out` only when `check_replaceable` allows.

    The old folder is moved aside first and removed last, so a crash leaves the old or the new one.
    """
    tmp, out = Path(tmp), Path(out)
    check_replaceable(out, kind=kind, overwrite=overwrite, protect=protect, owned=owned)
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # onto an empty folder, too
        return out
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, aside / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside / out.name, out)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
    return out


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def output_dir(out: str | Path, *, kind: str, overwrite: bool = False, protect: Iterable[str | Path] = (),
               owned: bool = False) -> Iterator[Path]:
    """Yield a new marked temporary folder beside `out`; on success it replaces `out` (`replace_dir`).

    Whether `out` may be replaced is checked first, before the caller's work. On any failure the
    temporary folder is removed; a full disk raises `DiskFullError` with a one-line message.
    """
    out = Path(out)
    protect = tuple(protect)
    check_replaceable(out, kind=kind, overwrite=overwrite, protect=protect, owned=owned)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_marker(tmp, kind)
        yield tmp
        _fsync_tree(tmp)
        normalize_modes(tmp)
        replace_dir(tmp, out, kind=kind, overwrite=overwrite, protect=protect, owned=owned)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, out) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def expand_shards(pattern: str | Path, suffixes: tuple[str, ...] = (".tar",)) -> list[Path | str]:
    """Resolve SHARDS: a folder (its files with `suffixes`), a glob, or a brace pattern.

    `data/{00000..00009}.tar` expands like img2dataset/webdataset patterns. Raises
    FileNotFoundError naming the pattern when nothing matches or a named shard is missing.
    Local shards come back as Paths; an object-store pattern (`s3://bucket/shards/{00000..00009}.tar`,
    `https://host/shards/00000.tar`) as URL strings (`t2i_recap.storage.expand`).
    """
    if storage.is_url(pattern):
        return list(storage.expand(str(pattern), suffixes))
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
