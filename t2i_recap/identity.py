"""Identity by content: digests of model folders and input shards, never their path strings.

A model folder (captioner, text encoder, VAE, an exported pipeline) or an input shard is named
by what it holds: re-saving weights in the same folder changes its digest, and the same files
copied or linked under another path keep it. Caches and resume decisions key on these digests.

Cost: every file is hashed in full (SHA-256, ~1 GB/s on one core), once per process. The
result is remembered under the file's (device, inode, size, mtime, ctime); a file written in
place changes its ctime (which no user tool can set back), so a remembered hash is reused only
for the very same unchanged file. A safetensors header alone is not enough: re-saving a
fine-tuned model keeps every tensor name, shape and offset, hence header and size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

CHUNK = 8 << 20
# Files that never change what a model computes: docs, licences, VCS and hub-download metadata.
_IGNORED_SUFFIXES = (".md", ".lock")
_IGNORED_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")

_memo: dict[tuple, str] = {}
_memo_lock = threading.Lock()


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), remembered per unchanged file for this process."""
    path = Path(path)
    key = _stat_key(path)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    digest = h.hexdigest()
    if _stat_key(path) == key:  # not remembered when the file changed while it was read
        with _memo_lock:
            _memo[key] = digest
    return digest


def _counts(rel: Path) -> bool:
    if any(part.startswith(".") for part in rel.parts):  # .git, .cache/huggingface, our output marker
        return False
    return not (rel.suffix.lower() in _IGNORED_SUFFIXES or rel.name.startswith(_IGNORED_PREFIXES))


def model_digest(path: str | Path) -> str:
    """Digest of a local model folder (or single weights file): every file that can change its outputs.

    Weights, configs, tokenizer files and chat templates are hashed with their relative names;
    READMEs, licences and hidden folders are not. Raises FileNotFoundError naming `path` when it
    does not exist (a hub id has no local content: callers record the id and revision instead).
    """
    path = Path(path)
    if path.is_file():
        return "sha256:" + file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(path)!r}: no such file or folder to take the digest of")
    h = hashlib.sha256()
    count = 0
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and _counts(rel):
            h.update(rel.as_posix().encode() + b"\0" + file_digest(f).encode() + b"\n")
            count += 1
    if count == 0:
        raise FileNotFoundError(f"model folder {str(path)!r} holds no files")
    return "sha256:" + h.hexdigest()


def shard_digest(path: str | Path) -> str:
    """Digest of one input shard's bytes (a .tar, .tar.gz or .parquet file)."""
    return "sha256:" + file_digest(path)


def stamp(path: str | Path) -> dict:
    """Size and mtime: the cheap check that a file is unchanged (the rule rsync and make use)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_content(path: str | Path, recorded: dict) -> bool:
    """True if `path` holds what `recorded` ({"digest", "size", "mtime_ns"}) describes.

    An equal size and mtime is trusted without reading the file; otherwise (copied, touched or
    rewritten) the file is hashed and compared with the recorded digest.
    """
    if not recorded.get("digest"):
        return False
    now = stamp(path)
    if recorded.get("size") is not None and now["size"] != recorded["size"]:
        return False
    if now == {"size": recorded.get("size"), "mtime_ns": recorded.get("mtime_ns")}:
        return True
    return shard_digest(path) == recorded["digest"]


def describe(path: str | Path) -> dict:
    """What a sidecar or cache file records of its input: digest, size and mtime."""
    return {"digest": shard_digest(path), **stamp(path)}
