"""Reading img2dataset/webdataset tar shards, safely, sample by sample.

Shared by the captioner and the trainer. A sample is the group of tar members that share a key
(the member's base name up to its first dot, as webdataset groups them). Nothing is extracted to
disk, so a member name like `../../x.jpg` cannot write anywhere; such names, links, folders and
unsafe keys are reported as bad samples with their reason instead of being dropped silently.

A shard may be a local file or an object-store URL (`t2i_recap.storage`): either is opened as a
file object and read front to back by tarfile's streaming mode, never copied to local disk first.
"""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path
from typing import Iterator

from t2i_recap import storage
from t2i_recap.io import UnsafeKeyError, check_key


@dataclasses.dataclass
class RawSample:
    """The members of one sample: `files` maps an extension ("jpg", "txt", "json") to bytes.

    `error` is set (and `files` may be partial) when the sample cannot be used as it is.
    """

    key: str
    shard: str
    files: dict[str, bytes]
    error: str | None = None


SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet")


def shard_id(path: str | Path) -> str:
    """The one name of a shard, used for its sidecar, its cache file and in stats.

    The file name without its shard suffix: `data/00012.tar` -> `00012`, `web.00000.tar` ->
    `web.00000` (never cut at the first dot, which would give two shards one name),
    `x.tar.gz` -> `x`, `part.parquet` -> `part`; any other file keeps its whole name. An object URL
    is named the same way (`s3://bucket/shards/00012.tar` -> `00012`), so a shard keeps its sidecar
    and cache file wherever it is stored.
    """
    name = storage.basename(path)
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _split_member(name: str) -> tuple[str, str]:
    while name.startswith("./"):  # `tar -C dir .` stores members as ./00000.jpg
        name = name[2:]
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return base, ""
    stem, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)]
    return prefix + stem, ext.lower()


def iter_tar_samples(path: str | Path) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in file order.

    Raises `tarfile.ReadError` naming the shard if it is not a readable tar at all; a tar that is
    cut short yields the samples before the damage and then one sample with the error.
    """
    path = storage.as_location(path)
    name = storage.basename(path)
    current: RawSample | None = None
    try:
        with storage.open_read(path) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if member.isdir() and member.name.strip("./") == "":
                    continue  # the archive's root folder entry (`./`), not a sample
                key, ext = _split_member(member.name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key=key, shard=name, files={})
                    try:
                        check_key(key)
                    except UnsafeKeyError as exc:
                        current.error = str(exc)
                if not member.isfile():
                    current.error = current.error or f"tar member {member.name!r} is not a regular file"
                    continue
                fh = tar.extractfile(member)
                current.files[ext] = fh.read() if fh is not None else b""
    except (tarfile.ReadError, EOFError, OSError) as exc:
        if current is None and not storage.exists(path):
            raise
        if current is not None:
            current.error = current.error or f"shard {name} is damaged here: {exc}"
            yield current
            return
        raise tarfile.ReadError(f"{path}: not a readable tar shard ({exc})") from exc
    if current is not None:
        yield current
