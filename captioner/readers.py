"""Input readers: every source becomes a list of shards, each an iterator of `Sample`s.

Sources: img2dataset/webdataset tar shards (the primary one: a folder, glob or brace pattern),
parquet files with image bytes or image paths (both local or in an object store: s3://, http(s)://,
hf://, streamed through `t2i_recap.storage`), an image folder with `metadata.jsonl` (the HF
`imagefolder` layout), and Hugging Face `datasets` by name or path (streamed).

A shard is the unit of resume and of the rank split: one sidecar is written per shard. Every
sample a source holds comes out as a `Sample`; one that cannot be captioned carries `error` (why)
instead of an image, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from PIL import Image

from t2i_recap import storage
from t2i_recap.caption_specs import (TABLE_ORIGINAL, WEBDATASET_COLUMNS, WEBDATASET_ORIGINAL, CaptionSpec,
                                     CaptionSpecError, SampleView, SpecCoverage, parse_spec, resolve, resolve_first)
from t2i_recap.images import DEFAULT_MAX_PIXELS, BadImage, decode_image
from t2i_recap.io import UnsafeKeyError, check_key, expand_shards
from t2i_recap.logging_utils import get_logger
from t2i_recap.shards import iter_tar_samples, shard_id

log = get_logger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes")
PATH_COLUMNS = ("image_path", "path", "file_name", "filepath")
# `org_caption` first: a Recap-DataComp-1B download keeps the alt-text there and the recaption in `.txt`.
CAPTION_COLUMNS = ("org_caption", "caption", "txt", "text", "alt_text")
KEY_COLUMNS = ("key", "__key__", "uid", "id", "sha256")
DEFAULT_MAX_CAPTION_CHARS = 20_000

Format = Literal["auto", "webdataset", "parquet", "imagefolder", "hf"]


@dataclasses.dataclass
class ReaderConfig:
    """How inputs are found and read."""

    format: Format = "auto"
    """Input kind; `auto` looks at the path (a folder's contents or the files a pattern matches)."""
    image_column: str | None = None
    """Column (parquet, HF) or metadata field holding image bytes; None tries common names."""
    path_column: str | None = None
    """Column holding image file paths (parquet: relative to the parquet file's folder)."""
    caption_column: str | None = None
    """Caption spec of the original caption (`t2i_recap.caption_specs`: txt, json:org_caption, column:NAME;
    one meaning on every route). None: a webdataset sample's json org_caption, else .txt, else json
    caption; a table's first column of org_caption, caption, txt, text, alt_text."""
    key_column: str | None = None
    """Column holding the sample key; None tries key, __key__, uid, id, sha256, else a row number."""
    hf_config: str | None = None
    """HF dataset configuration name."""
    hf_split: str = "train"
    """HF dataset split."""
    hf_data_files: str | None = None
    """`data_files` for a packaged builder, e.g. input `webdataset` or `parquet` with local or remote files."""
    samples_per_shard: int = 10_000
    """Samples per shard where the source has no shards of its own (image folders, HF datasets on disk)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are skipped as decompression bombs."""
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    """Longer original captions are cut (with a note), so one huge alt-text cannot bloat a sidecar."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_pixels < 1 or self.max_caption_chars < 1:
            raise ValueError("max_pixels and max_caption_chars must be >= 1")
        if self.caption_column is not None:
            spec = parse_spec(self.caption_column, "reader.caption_column")
            if spec.kind == "sidecar":
                raise ValueError(f"reader.caption_column={self.caption_column!r}: the captioner reads original "
                                 "captions from its input, not from a sidecar")

    def caption_spec(self) -> CaptionSpec | None:
        return parse_spec(self.caption_column) if self.caption_column is not None else None


@dataclasses.dataclass
class Sample:
    key: str
    shard: str
    image: Image.Image | None = None
    org_caption: str | None = None
    error: str | None = None  # why the sample is skipped; then `image` is None
    notes: list[str] = dataclasses.field(default_factory=list)  # safe conversions applied
    url: str | None = None  # where img2dataset downloaded it from (its .json `url`), when known
    sha256: str | None = None  # img2dataset's hash of the image bytes (its .json `sha256`), when known


@dataclasses.dataclass
class Shard:
    """One unit of work: `name` is the sidecar's file stem, `source` says where it comes from."""

    name: str
    source: str
    opener: Callable[[], Iterator[Sample]]

    def samples(self) -> Iterator[Sample]:
        return self.opener()


# ---------------------------------------------------------------- field decoding, shared by all readers


def decode_caption(raw: Any, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[str | None, list[str]]:
    """Bytes or text -> stripped text (None when missing or blank) and notes on what was fixed."""
    notes: list[str] = []
    if raw is None:
        return None, notes
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            notes.append(f"caption is not valid UTF-8 ({exc.reason} at byte {exc.start}); bad bytes replaced")
            raw = raw.decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = str(raw)
    text = raw.replace("\x00", "").strip()
    if len(text) > max_chars:
        notes.append(f"caption cut from {len(text)} to {max_chars} characters")
        text = text[:max_chars]
    return (text or None), notes


def _safe_key(key: Any) -> tuple[str, str | None]:
    key = "" if key is None else str(key)
    try:
        return check_key(key), None
    except UnsafeKeyError as exc:
        return key, str(exc)


def _finish(sample: Sample, data: bytes | None, cfg: ReaderConfig) -> Sample:
    """Decode the image bytes into `sample` (or set its error)."""
    if sample.error is not None:
        return sample
    if data is None:
        sample.error = sample.error or "no image in this sample"
        return sample
    try:
        decoded = decode_image(data, cfg.max_pixels)
    except BadImage as exc:
        sample.error = str(exc)
        return sample
    sample.image = decoded.image
    sample.notes.extend(decoded.notes)
    return sample


def _pick(names: tuple[str, ...] | list[str], wanted: str | None, available: list[str], what: str) -> str | None:
    if wanted is not None:
        if wanted not in available:
            raise ValueError(f"{what} column {wanted!r} not found; columns are {available}")
        return wanted
    return next((n for n in names if n in available), None)


@dataclasses.dataclass
class _Columns:
    """Which fields of a row dict hold the key, image bytes, image path and caption."""

    key: str | None
    image: str | None
    path: str | None
    caption: str | None

    @classmethod
    def resolve(cls, available: list[str], cfg: ReaderConfig, where: str, need_image: bool = True) -> "_Columns":
        cols = cls(
            key=_pick(KEY_COLUMNS, cfg.key_column, available, "key"),
            image=_pick(IMAGE_COLUMNS, cfg.image_column, available, "image"),
            path=_pick(PATH_COLUMNS, cfg.path_column, available, "image path"),
            caption=_table_caption(available, cfg, where),
        )
        if need_image and cols.image is None and cols.path is None:
            raise ValueError(
                f"{where}: no image column (tried {list(IMAGE_COLUMNS)} and paths {list(PATH_COLUMNS)}); "
                f"columns are {available}. An img2dataset metadata parquet holds no images: read the .tar shards."
            )
        return cols


def _table_caption(available: list[str], cfg: ReaderConfig, where: str) -> str | None:
    """The caption column of a table: the named spec's column (checked), else the first default present."""
    spec = cfg.caption_spec()
    if spec is None:
        return next((s.split(":", 1)[1] for s in TABLE_ORIGINAL if s.split(":", 1)[1] in available), None)
    column = "json" if spec.kind == "json" else spec.name
    if column not in available:
        raise ValueError(f"{where}: caption spec {spec.text!r} needs a {column!r} column; columns are {available}")
    return column


def _row_caption(row: dict, cols: _Columns, cfg: ReaderConfig) -> Any:
    spec = cfg.caption_spec()
    if spec is None:
        return row.get(cols.caption) if cols.caption else None
    return resolve(spec, SampleView(row))


def _row_sample(row: dict, cols: _Columns, shard: str, fallback_key: str, cfg: ReaderConfig,
                base_dir: Path | str | None) -> Sample:
    key, key_error = _safe_key(row.get(cols.key) if cols.key else fallback_key)
    try:
        caption, notes = decode_caption(_row_caption(row, cols, cfg), cfg.max_caption_chars)
    except CaptionSpecError as exc:
        caption, notes = None, [f"no original caption: {exc}"]
    sample = Sample(key=key, shard=shard, org_caption=caption, error=key_error, notes=notes)
    data, error = _row_image_bytes(row, cols, base_dir)
    if error:
        sample.error = sample.error or error
    return _finish(sample, data, cfg)


def _row_image_bytes(row: dict, cols: _Columns, base_dir: Path | str | None) -> tuple[bytes | None, str | None]:
    value = row.get(cols.image) if cols.image else None
    path = row.get(cols.path) if cols.path else None
    if isinstance(value, dict):  # HF `Image` feature stored as {"bytes": ..., "path": ...}
        value, path = value.get("bytes"), value.get("path") or path
    if isinstance(value, Image.Image):  # a `datasets` Image feature that was decoded already
        return _encode_png(value), None
    if value is not None:
        return bytes(value), None
    if path is None:
        return None, "no image bytes or image path in this row"
    return _read_path(str(path), base_dir)


def _encode_png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _read_path(path: str, base_dir: Path | str | None) -> tuple[bytes | None, str | None]:
    """An image file named by a row: a URL, an absolute path, or a path relative to `base_dir` (a local
    folder or an object-store prefix: the folder of the parquet file that names it)."""
    if storage.is_url(path):
        target: Path | str = path
    elif storage.is_url(base_dir) and not path.startswith("/"):
        target = f"{str(base_dir).rstrip('/')}/{path}"
    else:
        target = Path(path)
        if base_dir is not None and not target.is_absolute():
            target = Path(base_dir) / target
    try:
        return storage.read_bytes(target), None
    except OSError as exc:
        return None, f"cannot read image file {path!r}: {exc.strerror or exc}"


# ---------------------------------------------------------------- webdataset tar shards


def _tar_samples(path: Path | str, cfg: ReaderConfig) -> Iterator[Sample]:
    coverage = _coverage(cfg, str(path))
    for raw in iter_tar_samples(path):
        yield _webdataset_sample(raw.key, shard_name(path), raw.error, raw.files, cfg, coverage)
    if coverage is not None:
        coverage.finish()


def _coverage(cfg: ReaderConfig, shard: str) -> SpecCoverage | None:
    """A named caption spec must find a caption somewhere in each shard; the default may find none."""
    spec = cfg.caption_spec()
    return SpecCoverage({"original caption": spec}, shard) if spec is not None else None


def _webdataset_sample(key: str, shard: str, error: str | None, files: dict[str, Any], cfg: ReaderConfig,
                       coverage: SpecCoverage | None) -> Sample:
    """One webdataset sample, from a tar or from a row `datasets` made of one: the same fields, the same caption."""
    sample = Sample(key=key, shard=shard, error=error)
    sample.url, sample.sha256 = _download_ids(files)
    caption_raw = _webdataset_caption(files, cfg, sample.notes)
    sample.org_caption, notes = decode_caption(caption_raw, cfg.max_caption_chars)
    sample.notes.extend(notes)
    if coverage is not None and error is None:
        coverage.add({"original caption": sample.org_caption})
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None and sample.error is None:
        sample.error = f"no image member (members: {sorted(files) or 'none'})"
    data = files.get(ext) if ext else None
    if isinstance(data, dict):  # an HF `Image` feature stored undecoded: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    return _finish(sample, data, cfg)


def _download_ids(files: dict[str, Any]) -> tuple[str | None, str | None]:
    """img2dataset's `url` and `sha256` from the sample's .json, carried into the sidecar so the
    released Recap-DataComp-1B captions join it by either; (None, None) where the json lacks them."""
    try:
        meta = SampleView(files).json() or {}
    except CaptionSpecError:  # an unreadable .json: the caption path reports it
        return None, None
    url, sha = meta.get("url"), meta.get("sha256")
    return (url if isinstance(url, str) and url else None), (sha if isinstance(sha, str) and sha else None)


def _webdataset_caption(files: dict[str, Any], cfg: ReaderConfig, notes: list[str]) -> Any:
    """The original caption: the named spec, else json `org_caption` (Recap-DataComp-1B), `.txt`, json `caption`."""
    view = SampleView(files)
    spec = cfg.caption_spec()
    try:
        if spec is not None:
            return resolve(spec, view)
        return resolve_first(tuple(parse_spec(s) for s in WEBDATASET_ORIGINAL), view)[0]
    except CaptionSpecError as exc:
        notes.append(f"{exc}; ignored")
        return resolve(parse_spec("txt"), view) if spec is None else None


# ---------------------------------------------------------------- parquet


def _parquet_samples(path: Path | str, cfg: ReaderConfig) -> Iterator[Sample]:
    pf = storage.parquet_file(path)  # an object is read by row group, through the fsspec filesystem
    cols = _Columns.resolve(pf.schema_arrow.names, cfg, str(path))
    wanted = [c for c in dataclasses.astuple(cols) if c is not None]
    index = 0
    coverage = _coverage(cfg, str(path))
    for batch in pf.iter_batches(batch_size=256, columns=list(dict.fromkeys(wanted))):
        for row in batch.to_pylist():
            sample = _row_sample(row, cols, shard_name(path), f"{_stem_key(path)}-{index:06d}", cfg,
                                 storage.parent(path))
            if coverage is not None and sample.error is None:
                coverage.add({"original caption": sample.org_caption})
            yield sample
            index += 1
    if coverage is not None:
        coverage.finish()


def _stem_key(path: Path | str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", shard_name(path)).lstrip("._-") or "shard"


# ---------------------------------------------------------------- image folder with metadata.jsonl


def _folder_entries(root: Path) -> list[tuple[str, dict | None, str | None]]:
    """(relative image path, metadata row or None, error) for every listed or present image."""
    entries: list[tuple[str, dict | None, str | None]] = []
    listed: set[str] = set()
    meta_path = root / "metadata.jsonl"
    if meta_path.exists():
        for n, line in enumerate(meta_path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                if not isinstance(name, str):
                    raise TypeError("file_name is not a string")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                entries.append((f"metadata.jsonl:{n}", None, f"metadata.jsonl line {n} unusable: {type(exc).__name__}: {exc}"))
                continue
            listed.add(str(Path(name)))
            entries.append((name, row, None))
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTS and rel not in listed:
            entries.append((rel, None, None))
    return entries


def _folder_caption(row: dict, rel: str, cfg: ReaderConfig) -> tuple[Any, list[str]]:
    """A metadata.jsonl row's original caption by the same spec as a table row's; a row without it has none."""
    if not row:
        return None, []
    try:
        return _row_caption(row, _Columns(None, None, None, _table_caption(list(row), cfg, rel)), cfg), []
    except ValueError as exc:  # CaptionSpecError too: the image is still captioned, without a hint
        return None, [f"no original caption: {exc}"]


def _folder_samples(root: Path, entries: list, shard: str, cfg: ReaderConfig) -> Iterator[Sample]:
    resolved_root = root.resolve()
    for rel, row, error in entries:
        row = row or {}
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(Path(rel).with_suffix(""))).lstrip("._-")
        key, key_error = _safe_key(row.get(cfg.key_column or "key", stem))
        caption_raw, spec_note = _folder_caption(row, rel, cfg)
        caption, notes = decode_caption(caption_raw, cfg.max_caption_chars)
        notes.extend(spec_note)
        if not row and error is None:
            notes.append("image not listed in metadata.jsonl: no original caption")
        sample = Sample(key=key, shard=shard, org_caption=caption, error=error or key_error, notes=notes)
        data = None
        if sample.error is None:
            target = (root / rel).resolve()
            if resolved_root not in target.parents:
                sample.error = f"file_name {rel!r} points outside the image folder"
            else:
                data, sample.error = _read_path(str(target), None)
        yield _finish(sample, data, cfg)


# ---------------------------------------------------------------- Hugging Face datasets


def _hf_shards(name: str, cfg: ReaderConfig) -> list[Shard]:
    import datasets

    path = Path(name)
    prefix = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.name or name).lstrip("._-") or "hf"
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.hf_split]
        ds = _undecoded(ds)
        n = max(1, -(-len(ds) // cfg.samples_per_shard))
        bounds = [(i * cfg.samples_per_shard, min(len(ds), (i + 1) * cfg.samples_per_shard)) for i in range(n)]
        return [
            Shard(f"{prefix}-{i:05d}", f"{name}[{a}:{b}]", lambda a=a, b=b, i=i: _hf_rows(ds.select(range(a, b)), f"{prefix}-{i:05d}", a, cfg))
            for i, (a, b) in enumerate(bounds)
        ]
    files = _local_data_files(cfg.hf_data_files)
    if files:
        # One stream per data file, named as the file is (00012.tar -> 00012): the sidecars join the
        # tars they came from, whichever route read them.
        shards = [Shard(shard_name(f), f"{name} ({f})",
                        lambda f=f: _hf_rows(_undecoded(datasets.load_dataset(
                            name, cfg.hf_config, data_files=[str(f)], split=cfg.hf_split, streaming=True)),
                            shard_name(f), 0, cfg))
                  for f in files]
        _check_unique(shards, name)
        return shards
    ds = datasets.load_dataset(name, cfg.hf_config, data_files=cfg.hf_data_files, split=cfg.hf_split, streaming=True)
    ds = _undecoded(ds)
    # A streamed dataset's shards are its data files: stable across runs, so resume and the rank
    # split work exactly as for tar shards.
    n = ds.num_shards
    return [
        Shard(f"{prefix}-{i:05d}", f"{name} (stream shard {i} of {n})",
              lambda i=i: _hf_rows(ds.shard(num_shards=n, index=i), f"{prefix}-{i:05d}", 0, cfg))
        for i in range(n)
    ]


def _local_data_files(data_files: str | None) -> list[Path]:
    """The local files `data_files` names (a file, folder, glob or brace pattern), or [] for remote ones."""
    if not data_files or "://" in data_files:
        return []
    try:
        return expand_shards(data_files, suffixes=(".tar", ".tar.gz", ".tgz", ".parquet", ".jsonl", ".json",
                                                   ".csv", ".arrow"))
    except (FileNotFoundError, ValueError):
        return []


def _undecoded(ds):
    """Turn off `datasets`' own image decoding so our safe decoder sees the raw bytes."""
    import datasets

    for col, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _hf_rows(ds, shard: str, start: int, cfg: ReaderConfig) -> Iterator[Sample]:
    cols = None
    coverage = _coverage(cfg, shard)
    for index, row in enumerate(ds, start=start):
        if all(c in row for c in WEBDATASET_COLUMNS):  # `datasets`' webdataset builder: a tar sample as a row
            key, key_error = _safe_key(row["__key__"])
            files = {k: v for k, v in row.items() if k not in WEBDATASET_COLUMNS}
            yield _webdataset_sample(key, shard, key_error, files, cfg, coverage)
            continue
        if cols is None:
            cols = _Columns.resolve(list(row), cfg, f"dataset shard {shard}")
        sample = _row_sample(row, cols, shard, f"{shard}-{index:06d}", cfg, None)
        if coverage is not None and sample.error is None:
            coverage.add({"original caption": sample.org_caption})
        yield sample
    if coverage is not None:
        coverage.finish()


# ---------------------------------------------------------------- entry point


def shard_name(path: Path | str) -> str:
    """`data/00012.tar` -> `00012`: the shard identity every package uses (`t2i_recap.shards.shard_id`)."""
    return shard_id(path)


def detect_format(source: str) -> str:
    path = Path(source)
    if not storage.is_url(source) and path.is_dir():
        names = [p.name for p in path.iterdir()]
        if "metadata.jsonl" in names:
            return "imagefolder"
        if any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in names):
            return "webdataset"
        if "state.json" in names or "dataset_dict.json" in names:
            return "hf"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.lower().endswith(tuple("." + e for e in IMAGE_EXTS)) for n in names):
            return "imagefolder"
        raise ValueError(f"{source}: cannot tell the input format from the folder's files; pass --input-format")
    files = expand_shards(source, suffixes=(".tar", ".tar.gz", ".tgz", ".parquet"))
    kinds = {"parquet" if str(p).endswith(".parquet") else "webdataset" for p in files}
    if len(kinds) > 1:
        raise ValueError(f"{source}: matches both tar and parquet files; narrow the pattern or pass --input-format")
    return kinds.pop()


def open_shards(source: str, cfg: ReaderConfig | None = None) -> list[Shard]:
    """All shards of `source`, in a stable order (the rank split and resume depend on it)."""
    cfg = cfg or ReaderConfig()
    fmt = cfg.format if cfg.format != "auto" else detect_format(source)
    if fmt == "imagefolder" and storage.is_url(source):
        raise ValueError(f"{source}: an image folder input must be a local folder; put tar or parquet shards in "
                         "the object store instead")
    if fmt == "hf":
        return _hf_shards(source, cfg)
    if fmt == "imagefolder":
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"{source}: an image folder input must be a folder")
        entries = _folder_entries(root)
        if not entries:
            raise FileNotFoundError(f"{source}: no images and no metadata.jsonl rows")
        n = cfg.samples_per_shard
        prefix = re.sub(r"[^A-Za-z0-9_.\-]", "_", root.resolve().name).lstrip("._-") or "images"
        chunks = [entries[i : i + n] for i in range(0, len(entries), n)]
        return [
            Shard(f"{prefix}-{i:05d}", f"{source} (entries {i * n}..{i * n + len(c) - 1})",
                  lambda c=c, i=i: _folder_samples(root, c, f"{prefix}-{i:05d}", cfg))
            for i, c in enumerate(chunks)
        ]
    suffixes = (".parquet",) if fmt == "parquet" else (".tar", ".tar.gz", ".tgz")
    files = expand_shards(source, suffixes=suffixes)
    reader = _parquet_samples if fmt == "parquet" else _tar_samples
    shards = [Shard(shard_name(p), str(p), lambda p=p: reader(p, cfg)) for p in files]
    _check_unique(shards, source)
    return shards


def _check_unique(shards: list[Shard], source: str) -> None:
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen:
            raise ValueError(
                f"{source}: shards {seen[s.name]} and {s.source} would write the same sidecar {s.name}.parquet; "
                "caption them into different --out folders"
            )
        seen[s.name] = s.source
