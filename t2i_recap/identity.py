"""Identity by content: digests of model folders and input shards, never their path strings.

A model folder (captioner, text encoder, VAE, an exported pipeline) or an input shard is named
by what it holds: re-saving weights in the same folder changes its digest, and the same files
copied or linked under another path keep it. Caches and resume decisions key on these digests.

Cost: every file is hashed in full (SHA-256, ~1 GB/s on one core), once per process. The
result is remembered under the file's (device, inode, size, mtime, ctime); a file written in
place changes its ctime (which no user tool can set back), so a remembered hash is reused only
for the very same unchanged file. A safetensors header alone is not enough: re-saving a
fine-tuned model keeps every tensor name, shape and offset, hence header and size.

A shard in an object store (`t2i_recap.storage`: s3://, http(s)://, hf://) has the same digest as
the same bytes on local disk: the SHA-256 of its content, streamed once per process (remembered
under its URL, size, mtime and ETag), or taken from the store where it records it (the hub's LFS
sha256). Its cheap check is size + mtime as for a file, and the store's ETag when both the record
and the store have one: an S3 object's ETag changes whenever its bytes do, so an unchanged ETag
spares the full read that a copied object (same bytes, new mtime) would otherwise need.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from t2i_recap import storage

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
    """SHA-256 of a file's (or object's) bytes (hex), remembered per unchanged file for this process."""
    if storage.is_url(path):
        return _object_digest(str(path))
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


def _object_digest(url: str) -> str:
    meta = storage.info(url)
    if meta["sha256"]:
        return meta["sha256"]
    key = (url, meta["size"], meta["mtime_ns"], meta["etag"])
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    digest = storage.sha256(url)
    if storage.info(url) == meta:  # not remembered when the object was replaced while it was read
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
    """Digest of one input shard's bytes (a .tar, .tar.gz or .parquet file or object)."""
    return "sha256:" + file_digest(path)


def stamp(path: str | Path) -> dict:
    """Size and mtime: the cheap check that a file is unchanged (the rule rsync and make use).

    An object's mtime is its store's last-modified time (None where the store gives none)."""
    if storage.is_url(path):
        meta = storage.info(path)
        return {"size": meta["size"], "mtime_ns": meta["mtime_ns"]}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_content(path: str | Path, recorded: dict) -> bool:
    """True if `path` holds what `recorded` ({"digest", "size", "mtime_ns"}) describes.

    An equal size and mtime is trusted without reading the file; otherwise (copied, touched or
    rewritten) the file is hashed and compared with the recorded digest. An object whose record
    and store both give an ETag is judged by size + ETag instead of mtime (equal: the same bytes;
    different: hashed, as the same bytes uploaded in other parts get another ETag).
    """
    if not recorded.get("digest"):
        return False
    if storage.is_url(path):
        meta = storage.info(path)
        now = {"size": meta["size"], "mtime_ns": meta["mtime_ns"]}
        etag = meta["etag"]
    else:
        now, etag = stamp(path), None
    if recorded.get("size") is not None and now["size"] is not None and now["size"] != recorded["size"]:
        return False
    if etag and recorded.get("etag"):
        if etag == recorded["etag"] and now["size"] == recorded.get("size"):
            return True
    elif now["mtime_ns"] is not None and now == {"size": recorded.get("size"), "mtime_ns": recorded.get("mtime_ns")}:
        return True
    return shard_digest(path) == recorded["digest"]


def describe(path: str | Path) -> dict:
    """What a sidecar or cache file records of its input: digest, size and mtime (an object: and its ETag)."""
    if storage.is_url(path):
        meta = storage.info(path)
        out = {"digest": shard_digest(path), "size": meta["size"], "mtime_ns": meta["mtime_ns"]}
        return {**out, "etag": meta["etag"]} if meta["etag"] else out
    return {"digest": shard_digest(path), **stamp(path)}
