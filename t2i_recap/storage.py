"""Where data lives: a local path, or an object-store URL served by fsspec (s3://, http(s)://, hf://).

Every function here takes either. A local path stays a `pathlib.Path` and keeps the local fast
paths (temp file + fsync + `os.replace` writes, stat-based identity); a URL stays a `str` and goes
through the fsspec filesystem of its scheme:

- `s3://bucket/key`: s3fs (the `s3` extra). Credentials, region and profile come from the standard
  AWS variables and files, as botocore finds them. The endpoint of an S3-compatible store (MinIO,
  Ceph, R2, a local test server) comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`: botocore
  itself routes requests by them, but s3fs does not read them, so they are passed to it as
  `endpoint_url` explicitly.
- `http(s)://host/path`: read only (fsspec's HTTPFileSystem; aiohttp, in the `s3` extra).
- `hf://datasets/org/name/path`: huggingface_hub's HfFileSystem (read; writes commit to the hub).

Reads stream: a shard is opened as a file object and read front to back (tarfile's streaming
mode), parquet through pyarrow with the fsspec filesystem; nothing is copied to local disk first.

Writes keep their exactly-once meaning on stores without rename: an object is sent whole in one
request (S3 PUT, or a multipart upload that becomes visible only at its completion), to its final
key, never as a temp object renamed later. So an object's presence means it is complete, which is
what resume trusts. fsspec's writable file objects are NOT used for outputs: their `__exit__`
commits whatever was written, even when the block raised, which would publish a partial object.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Union

from braceexpand import braceexpand

from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)

Location = Union[Path, str]
"""A local `Path` or a URL string."""

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
READ_BLOCK = 8 << 20
"""Bytes fetched per request when streaming an object (one tar shard is read front to back)."""
_READ_ONLY = ("http", "https")
_EXTRA_FOR = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "http": ("aiohttp", "s3"), "https": ("aiohttp", "s3")}
_fs_lock = threading.Lock()


def scheme(location: Location) -> str | None:
    """The URL scheme (`s3`, `https`, `hf`, ...) of `location`, or None for a local path."""
    if isinstance(location, Path):
        return None
    m = _URL_RE.match(str(location))
    return m.group(1).lower() if m and m.group(1).lower() != "file" else None


def is_url(location: Location | None) -> bool:
    """True when `location` names an object store (not a local path; `file://` counts as local)."""
    return location is not None and scheme(location) is not None


def as_location(text: str | Path) -> Location:
    """`Path` for a local path (a `file://` URL included), the URL string itself for a remote one.

    `Path("s3://b/k")` would silently become the local relative path `s3:/b/k`: every path that
    may be a URL goes through here instead.
    """
    if isinstance(text, Path):
        return text
    if is_url(text):
        return text
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


# ---------------------------------------------------------------- filesystems


def endpoint_url() -> str | None:
    """The S3 endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _options(proto: str) -> dict:
    if proto in ("s3", "s3a"):
        # No listings cache: whether a sidecar exists, and a shard's size and ETag, are asked again each
        # time (another process may have just written one); a cached listing would answer from the past.
        url = endpoint_url()
        return {"use_listings_cache": False, **({"endpoint_url": url} if url else {})}
    return {}


def filesystem(location: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of URL `location`; names the extra when its package is missing."""
    import fsspec

    from t2i_recap.extras import require

    proto = scheme(location)
    if proto is None:
        raise ValueError(f"{location!r} is a local path, not a URL")
    if proto in _EXTRA_FOR:
        module, extra = _EXTRA_FOR[proto]
        require(module, extra, f"needed to read and write {proto}:// paths")
    with _fs_lock:  # fsspec caches one instance per (class, options); creating it is not thread-safe
        fs, path = fsspec.core.url_to_fs(location, **_options(proto))
    return fs, path


def _url(fs, path: str) -> str:
    """The URL of `path` inside `fs` (as fsspec lists it, without a scheme)."""
    return fs.unstrip_protocol(path)


# ---------------------------------------------------------------- names


def basename(location: Location) -> str:
    """The last path component: `s3://b/shards/00012.tar` -> `00012.tar` (a URL's query is dropped)."""
    if not is_url(location):
        return Path(location).name
    return str(location).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def join(base: Location, *names: str) -> Location:
    """`base/name/...`; each name is one path component (no `/`, not `.` or `..`)."""
    for name in names:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a single file name to put under {base}")
    if not is_url(base):
        return Path(base).joinpath(*names)
    return "/".join([str(base).rstrip("/"), *names])


def parent(location: Location) -> Location:
    if not is_url(location):
        return Path(location).parent
    text = str(location).split("?", 1)[0].rstrip("/")
    return text.rsplit("/", 1)[0]


# ---------------------------------------------------------------- reading


def exists(location: Location) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(str(location))
    return bool(fs.exists(path))


def is_file(location: Location) -> bool:
    if not is_url(location):
        return Path(location).is_file()
    fs, path = filesystem(str(location))
    try:
        return bool(fs.isfile(path))
    except FileNotFoundError:
        return False


def open_read(location: Location, block_size: int = READ_BLOCK) -> IO[bytes]:
    """A binary file object reading `location` front to back (a tar shard).

    s3 and hf: ranged GETs of `block_size` bytes, read ahead. http(s): one streaming GET (fsspec's
    HTTPStreamFile), which also serves hosts without range requests (Python's http.server)."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(str(location))
    if scheme(location) in ("http", "https"):
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def open_seekable(location: Location) -> IO[bytes]:
    """A binary file object that can seek (a parquet footer); over http the host must serve ranges."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(str(location))
    return fs.open(path, "rb")


def read_bytes(location: Location) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    return fs.cat_file(path)


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


def parquet_file(location: Location):
    """A `pyarrow.parquet.ParquetFile` reading only the row groups and columns asked for."""
    import pyarrow.parquet as pq

    if not is_url(location):
        return pq.ParquetFile(location)
    fs, path = filesystem(str(location))
    return pq.ParquetFile(path, filesystem=fs)


def read_table(location: Location, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    if not is_url(location):
        return pq.read_table(location, columns=columns)
    fs, path = filesystem(str(location))
    return pq.read_table(path, columns=columns, filesystem=fs)


def read_schema(location: Location):
    import pyarrow.parquet as pq

    if not is_url(location):
        return pq.read_schema(location)
    fs, path = filesystem(str(location))
    return pq.read_schema(path, filesystem=fs)


def info(location: Location) -> dict:
    """What identifies an object without reading it: `size`, `mtime_ns` (None when the store gives
    none), `etag` (a strong validator the store changes whenever the content changes, or None) and
    `sha256` (hex, when the store records the content's SHA-256 itself, as the hub does for LFS files).

    Local files: size and mtime from stat, no etag.
    """
    if not is_url(location):
        st = os.stat(location)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": None, "sha256": None}
    fs, path = filesystem(str(location))
    fs.invalidate_cache(path)  # the store's answer now, not a listing made earlier in this process
    meta = fs.info(path)
    if meta.get("type") == "directory":
        raise IsADirectoryError(f"{location} is a folder, not an object")
    size = meta.get("size")
    return {"size": int(size) if size is not None else None, "mtime_ns": _mtime_ns(meta), "etag": _etag(meta),
            "sha256": ((meta.get("lfs") or {}).get("sha256") if isinstance(meta.get("lfs"), dict) else None)}


def _mtime_ns(meta: dict) -> int | None:
    import datetime
    from email.utils import parsedate_to_datetime

    value = next((meta[k] for k in ("LastModified", "last_modified", "mtime", "Last-Modified") if meta.get(k)), None)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1_000_000) * 1000  # exact to the microsecond, no float noise below
    return int(float(value) * 1e9)


def _etag(meta: dict) -> str | None:
    """A strong entity tag, or a hub blob id; weak HTTP tags (`W/"..."`) do not identify bytes."""
    value = meta.get("ETag") or meta.get("etag") or meta.get("blob_id")
    if not value or str(value).startswith("W/"):
        return None
    return str(value).strip('"')


def sha256(location: Location) -> str:
    """Hex SHA-256 of the object's bytes, streamed (one full read)."""
    h = hashlib.sha256()
    with open_read(location) as fh:
        while block := fh.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- listing


def expand(pattern: str, suffixes: tuple[str, ...]) -> list[str]:
    """The objects a URL names: a folder (`s3://b/shards/`: its objects ending in `suffixes`), a glob,
    or a brace pattern (`s3://b/shards/{00000..00099}.tar`). Raises FileNotFoundError naming the pattern
    when nothing matches or a named object is missing.

    A brace pattern is checked with one listing per folder (not one request per shard); over http,
    which has no listing, each named object is checked with a HEAD request.
    """
    fs, root = filesystem(pattern)
    if not _has_magic(pattern) and not pattern.endswith(tuple(suffixes)) and _is_dir(fs, root):
        found = sorted(_url(fs, p) for p in fs.find(root) if p.endswith(suffixes))
        if not found:
            raise FileNotFoundError(f"{pattern}: folder holds no {'/'.join(suffixes)} shards")
        return found
    out: list[str] = []
    listings: dict[str, set[str] | None] = {}
    for item in braceexpand(pattern):
        fs, path = filesystem(item)
        if _has_magic(item):
            out.extend(_url(fs, p) for p in sorted(fs.glob(path)))
        elif _listed(fs, path, listings):
            out.append(item)
        else:
            raise FileNotFoundError(f"{pattern}: shard {item} does not exist")
    if not out:
        raise FileNotFoundError(f"{pattern}: no shard matches")
    return list(dict.fromkeys(out))


def _has_magic(text: str) -> bool:
    return any(c in text.split("://", 1)[-1].split("?", 1)[0] for c in "*?[")


def _is_dir(fs, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except (FileNotFoundError, NotImplementedError):
        return False


def _listed(fs, path: str, listings: dict[str, set[str] | None]) -> bool:
    folder = path.rsplit("/", 1)[0]
    if folder not in listings:
        try:
            listings[folder] = {p.rstrip("/") for p in fs.ls(folder, detail=False)}
        except (FileNotFoundError, NotImplementedError, OSError, ValueError):
            listings[folder] = None  # no listing (http): ask for the object itself
    names = listings[folder]
    if names is not None and (path in names or fs.unstrip_protocol(path) in names):
        return True
    return bool(fs.isfile(path))  # no listing, or one that may be cut short (a paged html index)


# ---------------------------------------------------------------- writing


def makedirs(location: Location) -> None:
    """Create a local folder; object stores have none to create (a write to a missing bucket fails then)."""
    if not is_url(location):
        Path(location).mkdir(parents=True, exist_ok=True)
    else:
        _writable(location)


def _writable(location: Location) -> None:
    if scheme(location) in _READ_ONLY:
        raise ValueError(f"{location}: {scheme(location)}:// is read-only here; write outputs to a local folder "
                         "or an s3:// prefix")


def _remote(location: Location) -> str:
    if not is_url(location):
        raise ValueError(f"{location}: a local path; local files are written by t2i_recap.io (temp file + os.replace)")
    _writable(location)
    return str(location)


def write_bytes(url: str, data: bytes) -> None:
    """Send the whole of `data` to object `url`; it becomes visible under that key only when complete.

    One PUT to the final key (s3fs turns a large one into a multipart upload, which appears only
    when completed); never a temp object and a rename. `t2i_recap.io.atomic_write_bytes` takes a
    local path or a URL and comes here for the URL.
    """
    fs, path = filesystem(_remote(url))
    fs.pipe_file(path, bytes(data))
    fs.invalidate_cache(path)


def write_parquet(url: str, table, **kwargs) -> None:
    """Write a pyarrow table as one parquet object, serialised in memory first (a failure sends nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _remote(url)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    write_bytes(url, sink.getvalue().to_pybytes())


def remove(location: Location) -> None:
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(str(location))
    if fs.exists(path):
        fs.rm_file(path)


# ---------------------------------------------------------------- claims of a remote output


def claims_root(out: Location, claims_dir: str | None, world: int) -> Path:
    """The local or shared POSIX folder whose `.claims` keeps processes writing to `out` apart.

    Claims need O_EXCL file creation, which object stores lack. A local `out` keeps its claims
    inside it. A remote `out` keeps them under `claims_dir` (a folder every process can reach, e.g.
    an NFS mount), in a sub-folder named by the URL's digest so several outputs can share one
    `claims_dir`. Without `claims_dir`, one process (WORLD_SIZE=1) uses a private temporary folder
    (a second, overlapping run on the same `out` may then caption a shard twice; each sidecar is
    still whole); several processes are refused, since their claims could not see each other.
    """
    if not is_url(out):
        return Path(out)
    if claims_dir:
        if is_url(claims_dir):
            raise ValueError(f"claims_dir={claims_dir!r}: claims need a local or shared POSIX folder, not a URL")
        digest = hashlib.sha256(str(out).rstrip("/").encode()).hexdigest()[:16]
        root = Path(claims_dir).expanduser() / f"{re.sub(r'[^A-Za-z0-9]+', '_', str(out))[:64]}-{digest}"
        root.mkdir(parents=True, exist_ok=True)
        return root
    if world > 1:
        raise ValueError(f"--out {out} is an object store and this is one of {world} processes: their per-shard "
                         "claims need a POSIX folder all of them share; set claims_dir=/shared/folder "
                         "(--set claims_dir=...)")
    log.warning("output %s is an object store and no claims_dir is set: this single process keeps its claims in a "
                "private temporary folder, so another run on the same output at the same time is not kept apart",
                out)
    private = Path(tempfile.mkdtemp(prefix="t2i-recap-claims-"))
    atexit.register(shutil.rmtree, private, True)  # nobody else can see it: gone with the process
    return private
