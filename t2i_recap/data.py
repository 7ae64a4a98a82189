"""Training data: img2dataset webdataset shards or HF datasets, with captions joined from anywhere.

Captions are named by a *field spec* (`t2i_recap.caption_specs`: the same meaning on every route),
so any layout trains without conversion:
  "txt"               the `<key>.txt` tar member (any member extension works, e.g. "caption")
  "json:org_caption"  a field of the `<key>.json` member
  "sidecar:re_caption" a column of the recaption sidecar `<recaption_dir>/<shard id>.parquet`,
                      joined by key; rows whose status is not "ok" (the captioner's word for a
                      captioned row; "success" is accepted too) have no recaption
  "column:text"       a column of an HF dataset
The official Recap-DataComp-1B download (img2dataset with --caption_col re_caption) trains with
original_caption="json:org_caption", recaption="txt", as webdataset shards or through
hf_dataset="webdataset". A spec that finds no caption in any sample of a shard stops training with
an error naming the spec and the shard. Images go through `t2i_recap.images.decode_image`, the
captioner's decode (EXIF orientation, modes, bit depth), so the DiT trains on the pixels the
recaption describes.

Order is deterministic and resumable: every epoch the shards are shuffled with (seed, epoch), split
over ranks (by shard, or by sample when there are fewer shards than ranks), and passed through a
seeded shuffle buffer. A batch carries the cursor (epoch, offset) of the record after it; restarting
the stream at a saved cursor gives exactly the batches an uninterrupted run would have seen.
DataLoader workers take whole batches in turn (batch b -> worker b % num_workers), so the batch
order does not depend on the number of workers. With data.aspect_buckets the same stream is grouped
into one-bucket micro-batches (t2i_recap.buckets) and the cursor counts micro-batches of the epoch;
a mixture of data.sources has no epochs, so its bins fill within windows of data.bucket_window draws
and the cursor is (the mixed cursor at the window's start, micro-batches of the window).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from t2i_recap.buckets import BucketBatcher, header_size, nearest_bucket, upright_size
from t2i_recap.caption_specs import (DERIVED_VERSIONS, WEBDATASET_COLUMNS, CaptionSpecError, SampleView, SpecCoverage, caption_order,
                                     parse_spec, resolve_named)
from t2i_recap.images import BadImage, decode_image, decode_pil
from t2i_recap import storage
from t2i_recap.identity import file_digest, shard_digest, stamp
from t2i_recap.io import expand_shards
from t2i_recap.logging_utils import get_logger
from t2i_recap.shards import iter_tar_samples, shard_id
from t2i_recap.released import ReleasedCoverage, identity, load_index
from t2i_recap.sidecar_join import CAPTIONED, open_join
from t2i_recap.sources import MixedSource, SourceConfig, check_sources, source_configs

log = get_logger(__name__)

_CAPTIONED = CAPTIONED  # sidecar statuses of a usable recaption (skipped/failed rows hold none)
FLAGGED = "recaption flagged by the captioner"  # the reason of a sample dropped by data.flagged_recaptions=drop
# Example / batch / feature keys that are not caption names.
RESERVED_NAMES = ("key", "pixels", "cursor", "skipped", "mean", "logvar", "emb", "mask", "empty", "source",
                  "flagged_recaption", "dropped_flagged", "bucket", "bucket_row", "bucket_remainder")


@dataclasses.dataclass
class DataConfig:
    shards: str | None = None
    """img2dataset webdataset shards: a folder, glob or brace pattern (data/{00000..00099}.tar)."""
    recaption_dir: str | None = None
    """Folder of recaption sidecars, one `<shard id>.parquet` per input shard (`t2i_recap.shards.shard_id`)."""
    hf_dataset: str | None = None
    """Instead of shards: an HF dataset (hub name, loader name, or a save_to_disk folder)."""
    hf_data_files: list[str] = dataclasses.field(default_factory=list)
    """data_files for load_dataset (e.g. parquet files), when hf_dataset is a loader name."""
    hf_split: str = "train"
    """Split of the HF dataset."""
    hf_image_column: str = "image"
    """HF dataset column holding the image (PIL image, {"bytes": ...} or raw bytes)."""
    hf_key_column: str | None = None
    """HF dataset column with sample keys; None = the row index."""
    hf_rows_per_shard: int = 10000
    """HF datasets are cut into virtual shards of this many rows (for shuffling, ranks and the cache)."""
    original_caption: str = "txt"
    """Field spec of the ORIGINAL (web) caption (see module doc)."""
    recaption: str = "sidecar:re_caption"
    """Field spec of the recaption."""
    captions: dict[str, str | None] | None = None
    """Named captions: name -> field spec (see module doc), added to `original` and `recaption` (which
    hold original_caption and recaption; a name mapped to null removes it). Each one is encoded into
    the feature cache and drawn per sample per step with its mixing.weights weight."""
    image_extensions: list[str] = dataclasses.field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Tar member extensions tried, in order, for the image."""
    resolution: int = 256
    """Training resolution: shorter side resized to it, then centre-cropped square (with aspect_buckets:
    the bins are about resolution x resolution pixels each)."""
    aspect_buckets: bool = False
    """Aspect-ratio buckets (t2i_recap/buckets.py): each image trains at the PixArt bin nearest its aspect
    ratio (scaled to `resolution`), resized to cover it with a minimal centre crop; every micro-batch
    holds one bin. The DiT trains and generates at every bin."""
    bucket_multiple: int | None = None
    """With aspect_buckets: each bin side is a multiple of this many pixels (None: the latent patch, VAE
    downsampling x DiT patch size; a set value must be a multiple of it)."""
    bucket_window: int | None = None
    """With aspect_buckets and data.sources (a mixture has no epochs): bins fill within windows of this
    many draws per rank (None: 32768). What is left in bins that did not fill a micro-batch at a
    window's end is counted and not trained, as at an epoch's end; a resumed run replays its window
    from its start, reading image headers only."""
    random_flip: bool = False
    """Horizontal flips; off by default because captions say "left" and "right"."""
    shuffle_buffer: int = 1000
    """Records held in the shuffle buffer (per rank)."""
    num_workers: int = 0
    """DataLoader worker processes per rank for decoding."""
    min_recaption_coverage: float = 0.99
    """Share of a shard's samples that must find their row in its recaption sidecar; below it training stops."""
    released_captions: str | None = None
    """The released Recap-DataComp-1B parquet (a file, folder or glob; `t2i_recap.released`), read by
    caption specs released:COLUMN (e.g. released:re_caption) and joined to the shards' samples by join_on."""
    join_on: Literal["sha256", "url"] | None = None
    """Column shared by the released parquet and each sample's img2dataset .json: sha256 (null = sha256:
    the same image bytes) or url. Shards whose matched share is below min_recaption_coverage stop training."""
    sources: list[SourceConfig] | None = None
    """Several shard sets mixed per sample by weight (`t2i_recap.sources`), instead of data.shards; each
    names its shards, optionally its sidecars and caption specs (the rest comes from this section)."""
    flagged_recaptions: Literal["keep", "drop", "fallback"] | None = None
    """Recaptions the captioner flagged in its sidecar (finish_reason "length": cut at the token cap;
    repetition: true): keep (null = keep: trained on), drop (the sample is skipped) or fallback (the
    sample trains on its other captions: every sidecar column but org_caption reads as missing).
    Each is counted in summary.json (mix_counts.flagged_recaptions / dropped_flagged)."""

    def __post_init__(self) -> None:
        if self.shards and self.hf_dataset:
            raise ValueError("set either data.shards or data.hf_dataset, not both")
        for name in ("original_caption", "recaption"):
            parse_spec(getattr(self, name), f"data.{name}")
        self.caption_specs()  # names, specs and derivations checked here
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if not 0.0 <= self.min_recaption_coverage <= 1.0:
            raise ValueError(f"min_recaption_coverage must be in [0, 1], got {self.min_recaption_coverage}")
        if self.join_on not in (None, "sha256", "url"):
            raise ValueError(f"data.join_on must be sha256 or url, got {self.join_on!r}")
        reads_released = any(s.kind == "released" for s in self.parsed_specs().values())
        if reads_released != bool(self.released_captions) and not self.sources:
            raise ValueError("a caption spec reads released:COLUMN but data.released_captions is not set" if reads_released
                             else "data.released_captions is set but no caption reads it (name one released:COLUMN, "
                             "e.g. data.recaption: released:re_caption)")
        if self.sources:
            check_sources(self)
        if self.bucket_window is not None and self.bucket_window < 1:
            raise ValueError(f"data.bucket_window must be >= 1 draws, got {self.bucket_window}")
        if self.bucket_multiple is not None and self.bucket_multiple < 1:
            raise ValueError(f"data.bucket_multiple must be >= 1, got {self.bucket_multiple}")
        if self.flagged_recaptions not in (None, "keep", "drop", "fallback"):
            raise ValueError(f"data.flagged_recaptions must be keep, drop or fallback, got {self.flagged_recaptions!r}")
        if self.shuffle_buffer < 1 or self.hf_rows_per_shard < 1 or self.num_workers < 0:
            raise ValueError("shuffle_buffer and hf_rows_per_shard must be >= 1, num_workers >= 0")

    def caption_specs(self) -> dict[str, str]:
        """Every named caption: name -> spec text; `original` and `recaption` first unless removed."""
        named: dict[str, str | None] = {"original": self.original_caption, "recaption": self.recaption,
                                        **(self.captions or {})}
        out = {name: spec for name, spec in named.items() if spec is not None}
        for name, spec in out.items():
            if not name.isidentifier() or not name.islower() or name in RESERVED_NAMES:
                raise ValueError(f"data.captions: {name!r} is not a usable caption name (lower-case letters, digits "
                                 f"and _, starting with a letter; not one of {', '.join(RESERVED_NAMES)})")
            parse_spec(spec, f"data.captions.{name}")
        if not out:
            raise ValueError("data.captions removes every caption; name at least one")
        caption_order({n: parse_spec(s) for n, s in out.items()})
        return out

    def caption_fingerprint(self) -> dict:
        """What the feature cache's text features depend on: the named captions' specs (the same dict as
        before named captions for a two-caption config, so existing caches stay valid)."""
        if self.sources:
            return {"sources": {s.name: cfg.caption_fingerprint() for s, cfg in zip(self.sources, source_configs(self))}}
        fp: dict = self.caption_specs()
        derived = sorted({s.kind for s in self.parsed_specs().values() if s.kind in DERIVED_VERSIONS})
        if derived:  # the rule that derives them is part of what the features are
            fp = {**fp, "derived_versions": {k: DERIVED_VERSIONS[k] for k in derived}}
        if self.flagged_recaptions in ("drop", "fallback"):  # the cache holds no dropped sample, no fallen-back recaption
            fp = {**fp, "flagged_recaptions": self.flagged_recaptions}
        if self.released_captions:
            fp = {**fp, "released": identity(self.released_captions), "join_on": self.join_on or "sha256"}
        return fp

    def parsed_specs(self) -> dict:
        return {name: parse_spec(spec, f"data.captions.{name}") for name, spec in self.caption_specs().items()}

    def uses_sidecar(self) -> bool:
        return any(s.kind == "sidecar" for s in self.parsed_specs().values())


def _clean(text: Any) -> str | None:
    """A usable caption or None (missing, null, empty, not a string); tar members arrive as UTF-8 bytes."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return None
    # A lone surrogate (JSON "\ud800") is no character and makes tokenizers raise: U+FFFD instead.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").strip()
    return text or None


def load_image(data: bytes | Image.Image, resolution: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The captioner's decode (EXIF orientation, RGB, 16-bit rescaled, alpha on white), resize to cover
    + centre-crop -> (3, H, W) in [-1, 1]; (H, W) = `size` (an aspect bucket) or (R, R)."""
    img = (decode_pil(data) if isinstance(data, Image.Image) else decode_image(data)).image
    height, width = size or (resolution, resolution)
    if img.size != (width, height):
        img = ImageOps.fit(img, (width, height), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class Record(NamedTuple):
    """One undecoded sample: cheap to pass through the shuffle buffer and to skip on resume."""

    shard: str
    key: str
    payload: Any


class Skip(NamedTuple):
    key: str
    shard: str
    reason: str


class WebDatasetSource:
    """img2dataset webdataset shards (+ optional recaption sidecars)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.paths = expand_shards(cfg.shards)
        self.shards = [shard_id(p) for p in self.paths]
        _check_unique_ids(self.paths)
        self.specs = cfg.parsed_specs()
        self.caption_names = tuple(self.specs)
        if cfg.uses_sidecar() and not cfg.recaption_dir:
            raise ValueError("a caption spec reads the recaption sidecar (sidecar:...) but data.recaption_dir is not set")
        self.released = None
        if cfg.released_captions:
            columns = sorted({s.name for s in self.specs.values() if s.kind == "released"})
            self.released = load_index(cfg.released_captions, cfg.join_on or "sha256", columns)

    def sidecar_file(self, index: int) -> Path | str:
        return storage.join(storage.as_location(self.cfg.recaption_dir), f"{self.shards[index]}.parquet")

    def shard_stat(self, index: int) -> dict:
        """Size and mtime of the shard (and its sidecar): the feature cache's cheap freshness check."""
        path = self.paths[index]
        stat = {"shard": self.shards[index], **stamp(path)}  # a local file's stat, an object's size + last-modified
        if self.cfg.uses_sidecar():
            side = self.sidecar_file(index)
            if storage.is_file(side):
                side_stamp = stamp(side)
                stat.update(sidecar_size=side_stamp["size"], sidecar_mtime_ns=side_stamp["mtime_ns"])
        return stat

    def shard_content(self, index: int) -> dict:
        """Content digests of the shard (and its sidecar): what a cache file is valid for, wherever it lies."""
        out = {"shard": shard_digest(self.paths[index])}
        if self.cfg.uses_sidecar() and storage.is_file(self.sidecar_file(index)):
            out["sidecar"] = file_digest(self.sidecar_file(index))
        return out

    def records(self, index: int) -> Iterator[Record]:
        path = self.paths[index]
        join = (open_join(self.sidecar_file(index), path, self.cfg.min_recaption_coverage)
                if self.cfg.uses_sidecar() else None)
        seen: set[str] = set()
        coverage = SpecCoverage(self.specs, storage.basename(path))
        matched = ReleasedCoverage(self.released, self.shards[index], self.cfg.min_recaption_coverage) \
            if self.released is not None else None
        for raw in iter_tar_samples(path):
            if raw.key in seen and raw.error is None:
                raw.error = f"duplicate key {raw.key!r} in shard {raw.shard}; the first sample with it is used"
            seen.add(raw.key)
            released = self._released_row(raw) if matched is not None and not raw.error else None
            if matched is not None and not raw.error:
                matched.add(released)
            record = Record(self.shards[index], raw.key,
                            (raw, join.row(raw.key) if join and not raw.error else None, released))
            if not raw.error:
                found = self._captions(*record.payload)
                if not isinstance(found, str):
                    coverage.add(found)
            yield record
        if join is not None:
            join.finish()
        if matched is not None:
            matched.finish()
        coverage.finish()

    def _released_row(self, raw) -> dict | None:
        try:
            return self.released.lookup(SampleView(raw.files).json())
        except CaptionSpecError:  # a json member that is not an object matches nothing (the sample is skipped)
            return None

    def _captions(self, raw, row: dict | None, released: dict | None = None) -> dict[str, str | None] | str:
        """The named captions of a sample, or why the sample has none (a json member that is not an object)."""
        view = SampleView(raw.files, sidecar_row=row, captioned=tuple(_CAPTIONED), released_row=released,
                          recaption_flagged=self.cfg.flagged_recaptions == "fallback" and bool(flag_reason(row)))
        try:
            return resolve_named(self.specs, view, _clean)
        except CaptionSpecError as exc:
            return str(exc)

    buckets: list[tuple[int, int]] | None = None  # (height, width) bins; set by t2i_recap.buckets.enable_buckets

    def bucket_of(self, rec: Record) -> int | None:
        """The aspect bucket of a sample, from its image header (None: no readable image; decode says why)."""
        raw = rec.payload[0]
        ext = None if raw.error else next((e for e in self.cfg.image_extensions if e in raw.files), None)
        size = header_size(raw.files[ext]) if ext else None
        return nearest_bucket(*size, self.buckets) if size else None

    def decode(self, rec: Record, size: tuple[int, int] | None = None) -> dict | Skip:
        raw, row, released = rec.payload
        if raw.error:
            return Skip(rec.key, rec.shard, raw.error)
        ext = next((e for e in self.cfg.image_extensions if e in raw.files), None)
        if ext is None:
            return Skip(rec.key, rec.shard, f"no image member (looked for {self.cfg.image_extensions})")
        captions = self._captions(raw, row, released)
        if isinstance(captions, str):
            return Skip(rec.key, rec.shard, captions)
        flag = flag_reason(row)
        if flag and self.cfg.flagged_recaptions == "drop":
            return Skip(rec.key, rec.shard, f"{FLAGGED} ({flag}); data.flagged_recaptions=drop")
        return _example(rec, raw.files[ext], captions, self.cfg.resolution, bool(flag), size)

    def is_dropped(self, rec: Record) -> bool:
        """True for a sample data.flagged_recaptions=drop leaves out (known without decoding it)."""
        return self.cfg.flagged_recaptions == "drop" and bool(flag_reason(rec.payload[1]))


def flag_reason(row: dict | None) -> str | None:
    """Why the captioner flagged a sidecar row's recaption (captioner/writer.py Row), or None: it hit
    the generation cap (finish_reason "length") or repeats itself (repetition). Rows without a usable
    recaption (status not ok) are never flagged: they hold no recaption to drop."""
    if not row or row.get("status", "ok") not in _CAPTIONED:
        return None
    reasons = [r for r, hit in (("finish_reason=length", row.get("finish_reason") == "length"),
                                ("repetition", row.get("repetition") is True)) if hit]
    return ", ".join(reasons) or None


def _check_unique_ids(paths: list[Path]) -> None:
    """Two shards with one id would share a sidecar and a cache file: one trained twice, one never."""
    seen: dict[str, Path] = {}
    for p in paths:
        sid = shard_id(p)
        if sid in seen:
            raise ValueError(f"shards {seen[sid]} and {p} have the same shard id {sid!r} (their sidecar and cache "
                             "file would be one); rename one or train them from separate runs")
        seen[sid] = p


class HFDatasetSource:
    """A (map-style) HF dataset cut into virtual shards of hf_rows_per_shard rows."""

    def __init__(self, cfg: DataConfig) -> None:
        import datasets

        self.cfg = cfg
        path = Path(cfg.hf_dataset)
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(cfg.hf_dataset, data_files=cfg.hf_data_files or None, split=cfg.hf_split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.hf_split]
        self.ds = ds
        self.specs = cfg.parsed_specs()
        self.caption_names = tuple(self.specs)
        # A dataset `datasets` made of webdataset tars holds the members as columns (jpg, txt, json):
        # the specs read them exactly as they read the tar (t2i_recap.caption_specs).
        self.webdataset = all(c in ds.column_names for c in WEBDATASET_COLUMNS)
        for which, spec in self.specs.items():
            if spec.kind in ("sidecar", "released"):
                raise ValueError(f"data.{which}={spec.text!r}: {spec.kind} captions join webdataset shards "
                                 "(data.shards), not HF datasets")
            if spec.derived:
                continue
            column = "json" if spec.kind == "json" else spec.name
            if column not in ds.column_names:
                raise ValueError(f"data.{which}={spec.text!r}: the dataset has no {column!r} column "
                                 f"(columns: {ds.column_names})")
        self.image_column = self._image_column(ds.column_names)
        self.key_column = cfg.hf_key_column or ("__key__" if self.webdataset else None)
        n = len(ds)
        self.ranges = [(s, min(s + cfg.hf_rows_per_shard, n)) for s in range(0, n, cfg.hf_rows_per_shard)]
        self.shards = [f"hf-{i:05d}" for i in range(len(self.ranges))]

    def _image_column(self, columns: list[str]) -> str:
        if self.cfg.hf_image_column in columns:
            return self.cfg.hf_image_column
        found = next((e for e in self.cfg.image_extensions if e in columns), None) if self.webdataset else None
        if found is None:
            raise ValueError(f"data.hf_image_column={self.cfg.hf_image_column!r} is not a column of {columns}")
        return found

    def _caption_columns(self) -> list[str]:
        names = ["json" if s.kind == "json" else s.name for s in self.specs.values() if not s.derived]
        return list(dict.fromkeys(names + ([self.key_column] if self.key_column else [])))

    def shard_stat(self, index: int) -> dict:
        return {"shard": self.shards[index], "rows": list(self.ranges[index]), "dataset": self.ds._fingerprint}

    def shard_content(self, index: int) -> dict:
        return self.shard_stat(index)  # datasets' fingerprint is already a digest of the content

    def records(self, index: int) -> Iterator[Record]:
        """The shard's rows with their captions, read from the caption columns alone (no image decoded)."""
        start, stop = self.ranges[index]
        table = self.ds.select_columns(self._caption_columns())[start:stop]
        rows = [dict(zip(table, values)) for values in zip(*table.values())]
        where = f"{self.shards[index]} (rows {start}..{stop - 1} of {self.cfg.hf_dataset})"
        coverage = SpecCoverage(self.specs, where)
        records = []
        for i, row in zip(range(start, stop), rows):
            key = str(row[self.key_column]) if self.key_column else f"{i:09d}"
            try:
                captions = resolve_named(self.specs, SampleView(row), _clean)
                coverage.add(captions)
            except CaptionSpecError as exc:
                captions = str(exc)
            records.append(Record(self.shards[index], key, (i, captions)))
        coverage.finish()  # before any of the shard trains: a spec that finds nothing is a config error
        yield from records

    buckets: list[tuple[int, int]] | None = None  # (height, width) bins; set by t2i_recap.buckets.enable_buckets

    def _image(self, i: int):
        image = self.ds[i][self.image_column]
        return image.get("bytes") if isinstance(image, dict) else image

    def _header_view(self):
        """The dataset with its image column left encoded (datasets.Image(decode=False)), so a bucket
        lookup reads the file header instead of decoding every pixel a second time."""
        if getattr(self, "_headers", None) is None:
            import datasets

            feature = self.ds.features.get(self.image_column)
            self._headers = (self.ds.cast_column(self.image_column, datasets.Image(decode=False))
                             if isinstance(feature, datasets.Image) and feature.decode else self.ds)
        return self._headers

    def bucket_of(self, rec: Record) -> int | None:
        """The aspect bucket of a row's image, from its header; None: no usable image (decode says why)."""
        i, captions = rec.payload
        image = None
        if not isinstance(captions, str):
            image = self._header_view()[i][self.image_column]
            image = (image.get("bytes") or image.get("path")) if isinstance(image, dict) else image
        if image is None:
            return None
        size = upright_size(image) if isinstance(image, Image.Image) else header_size(image)
        return nearest_bucket(*size, self.buckets) if size else None

    def decode(self, rec: Record, size: tuple[int, int] | None = None) -> dict | Skip:
        i, captions = rec.payload
        if isinstance(captions, str):
            return Skip(rec.key, rec.shard, captions)
        image = self._image(i)
        if image is None:
            return Skip(rec.key, rec.shard, "no image")
        return _example(rec, image, captions, self.cfg.resolution, size=size)


def _example(rec: Record, image, captions: dict[str, str | None], resolution: int,
             flagged: bool = False, size: tuple[int, int] | None = None) -> dict | Skip:
    if all(text is None for text in captions.values()):
        return Skip(rec.key, rec.shard, "neither an original caption nor a recaption" if len(captions) == 2 else
                    f"none of the captions {', '.join(captions)}")
    try:
        pixels = load_image(image, resolution, size)
    except (BadImage, OSError, ValueError, Image.DecompressionBombError) as exc:
        return Skip(rec.key, rec.shard, f"image does not decode: {exc}")
    return {"key": rec.key, "pixels": pixels, **captions, "flagged_recaption": torch.tensor(flagged)}


def build_source(cfg: DataConfig):
    if cfg.sources:
        return MixedSource.build(cfg, WebDatasetSource, record=Record, stream=rank_records)
    if cfg.shards:
        return WebDatasetSource(cfg)
    if cfg.hf_dataset:
        return HFDatasetSource(cfg)
    raise ValueError("no training data: set data.shards (webdataset) or data.hf_dataset")


def shuffle_buffered(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Webdataset-style streaming shuffle with a seeded generator (deterministic for a fixed input)."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def rank_records(source, *, seed: int, rank: int, world: int, buffer: int,
                 start: tuple[int, int] = (0, 0)) -> Iterator[tuple[tuple[int, int], Record]]:
    """The endless, deterministic record stream of one rank, from cursor `start`; yields (cursor after, record)."""
    epoch, skip = start
    n = len(source.shards)
    while True:
        order = list(range(n))
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
        if n >= world:
            recs = itertools.chain.from_iterable(source.records(i) for i in order[rank::world])
        else:  # fewer shards than ranks: split by sample so no rank idles or repeats another's data
            chained = itertools.chain.from_iterable(source.records(i) for i in order)
            recs = (r for j, r in enumerate(chained) if j % world == rank)
        count = 0
        for idx, rec in enumerate(shuffle_buffered(recs, buffer, random.Random(f"buffer-{seed}-{epoch}-{rank}"))):
            count += 1
            if idx >= skip:
                yield (epoch, idx + 1), rec
        if count == 0:
            raise RuntimeError(f"rank {rank} of {world} got no samples in epoch {epoch} ({n} shards)")
        epoch, skip = epoch + 1, 0


def collate(examples: list[dict]) -> dict:
    """Stack tensors, keep strings/None as lists."""
    out: dict = {}
    for name in examples[0]:
        values = [e[name] for e in examples]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class BatchStream(torch.utils.data.IterableDataset):
    """Batches of one rank's stream; each carries "cursor" (resume point) and "skipped" (bad samples)."""

    def __init__(self, source, *, batch_size: int, seed: int, rank: int, world: int, buffer: int,
                 start: tuple[int, int] = (0, 0), random_flip: bool = False, bucketed: bool = False,
                 window: int | None = None) -> None:
        self.source, self.batch_size, self.seed, self.random_flip = source, batch_size, seed, random_flip
        self.rank, self.world, self.buffer, self.start = rank, world, buffer, tuple(start)
        self.bucketed, self.window = bucketed, window or BUCKET_WINDOW
        if bucketed and not getattr(source, "buckets", None):
            raise ValueError("a bucketed stream needs a source with aspect buckets (t2i_recap.buckets.enable_buckets)")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.bucketed:
            yield from self._bucketed(worker, workers)
            return
        kw = dict(seed=self.seed, rank=self.rank, world=self.world, buffer=self.buffer, start=self.start)
        mixed = getattr(self.source, "mixed_records", None)  # data.sources
        stream = mixed(**kw) if mixed is not None else rank_records(self.source, **kw)
        dropped = getattr(self.source, "is_dropped", None)
        for b in itertools.count():
            chunk, left_out = self._take(stream, dropped)
            if b % workers != worker:
                continue
            batch = self._batch(chunk)
            batch["dropped_flagged"] += left_out
            yield batch

    def _take(self, stream: Iterator, dropped) -> tuple[list, int]:
        """The next batch_size records the source keeps, and how many it left out on the way
        (data.flagged_recaptions=drop); every worker walks the same stream, so the batches are the same."""
        if dropped is None:
            return list(itertools.islice(stream, self.batch_size)), 0
        chunk, left_out = [], 0
        while len(chunk) < self.batch_size:
            cursor, rec = next(stream)
            if dropped(rec):
                left_out += 1
                if left_out > 1000 * self.batch_size:
                    raise RuntimeError("data.flagged_recaptions=drop leaves out nearly every sample (over "
                                       f"{left_out} in a row); check the captioner's sidecars")
                continue
            chunk.append((cursor, rec))
        return chunk, left_out

    def _bucketed(self, worker: int, workers: int) -> Iterator[dict]:
        """Micro-batches of one aspect bucket each (t2i_recap.buckets.BucketBatcher). The cursor is
        (epoch, micro-batches of that epoch so far): a resumed run replays its epoch from the start,
        reading headers only, and skips the micro-batches it trained."""
        kw = dict(seed=self.seed, rank=self.rank, world=self.world, buffer=self.buffer)
        mixed = getattr(self.source, "mixed_records", None)  # data.sources: windows of draws, not epochs
        if mixed is None:
            epoch, done = self.start
            stream = rank_records(self.source, **kw, start=(epoch, 0))
        else:
            base, done = self._window_start()
            epoch, stream = base[0] // self.window, windowed(mixed(**kw, start=base), self.window, base)
        dropped = getattr(self.source, "is_dropped", None)
        pending = {"left_out": 0, "skipped": [], "remainder": 0}

        def kept() -> Iterator:
            for cursor, rec in stream:
                if dropped is not None and dropped(rec):
                    pending["left_out"] += 1
                    continue
                yield cursor, rec

        table, count, current, b = self.source.buckets, 0, epoch, 0
        for item in BucketBatcher(kept(), self.source.bucket_of, self.batch_size):
            if item[0] == "remainder":
                if item[2]:
                    log.info("%s %d: %d samples left in aspect buckets that did not fill a micro-batch",
                             "epoch" if mixed is None else "window", item[1], item[2])
                pending["remainder"] += item[2]
                continue
            ep, index, chunk = item
            if ep != current:
                current, count = ep, 0
            replaying = (ep, count) < (epoch, done)
            if index is None:  # no readable image: its decode says why, and it is counted as skipped
                if not replaying:
                    pending["skipped"].append(self._unreadable(chunk[0][1]))
                continue
            count += 1
            if replaying:
                pending = {"left_out": 0, "skipped": [], "remainder": 0}
                continue
            mine, b = b % workers == worker, b + 1
            if mine:
                batch = self._batch(chunk, size=table[index])
                batch["cursor"] = [ep, count] if mixed is None else [*chunk[0][0][1], count]
                batch["skipped"] += len(pending["skipped"])
                batch["dropped_flagged"] += pending["left_out"] + sum(s.reason.startswith(FLAGGED)
                                                                      for s in pending["skipped"])
                batch["bucket_remainder"] = pending["remainder"]
                batch["bucket"] = "x".join(map(str, table[index]))
            pending = {"left_out": 0, "skipped": [], "remainder": 0}
            if mine:
                yield batch

    def _window_start(self) -> tuple[tuple, int]:
        """(the mixed cursor at the start of the window to replay, micro-batches of it already trained)."""
        n = len(self.source.subs)
        if len(self.start) == 2 + 2 * n:  # a bucketed mixture's own cursor
            return tuple(self.start[:-1]), int(self.start[-1])
        if len(self.start) != 2:
            raise ValueError(f"data cursor {list(self.start)} is not a bucketed cursor of {n} sources (was data.sources "
                             "or data.aspect_buckets changed?)")
        return (0, *[v for _ in range(n) for v in (self.start[0], 0)]), 0  # every source from that epoch

    def _unreadable(self, rec: Record) -> Skip:
        ex = self.source.decode(rec)
        if not isinstance(ex, Skip):
            raise RuntimeError(f"sample {rec.key} of {rec.shard}: its image header gives no size, yet it decodes")
        log.warning("skipping sample %s of %s: %s", ex.key, ex.shard, ex.reason)
        return ex

    def _batch(self, chunk: list, size: tuple[int, int] | None = None) -> dict:
        good, skipped = [], []
        for cursor, rec in chunk:
            ex = self.source.decode(rec) if size is None else self.source.decode(rec, size)
            if isinstance(ex, Skip):
                log.warning("skipping sample %s of %s: %s", ex.key, ex.shard, ex.reason)
                skipped.append(ex)
                continue
            # seeded by the sample's place in the stream, so a resumed run replays the same flips
            if self.random_flip and random.Random(f"flip-{self.seed}-{cursor}-{rec.key}").random() < 0.5:
                ex["pixels"] = ex["pixels"].flip(-1)
            good.append(ex)
        if not good:
            raise RuntimeError(f"every sample of a batch failed to load ({[s.reason for s in skipped][:3]}...)")
        batch = collate(good)
        batch["cursor"] = list(chunk[-1][0])
        batch["skipped"] = len(skipped)
        batch["dropped_flagged"] = sum(s.reason.startswith(FLAGGED) for s in skipped)
        return batch


BUCKET_WINDOW = 32768
"""Draws per rank in which a bucketed mixture of data.sources fills its bins (data.bucket_window)."""


def windowed(stream: Iterator, window: int, base: tuple) -> Iterator[tuple[tuple, Record]]:
    """A mixed record stream (cursor after each record, record) cut into windows of `window` draws:
    yields ((window index, mixed cursor at the window's start), record). `base` is the cursor the
    stream starts at, itself the start of a window."""
    start, current = tuple(base), base[0] // window
    last = start
    for cursor, rec in stream:
        w = (cursor[0] - 1) // window
        if w != current:
            current, start = w, last
        last = tuple(cursor)
        yield (w, start), rec


def make_loader(source, *, batch_size: int, seed: int, rank: int, world: int, buffer: int,
                num_workers: int, start: tuple[int, int] = (0, 0), random_flip: bool = False,
                bucketed: bool = False, window: int | None = None) -> torch.utils.data.DataLoader:
    stream = BatchStream(source, batch_size=batch_size, seed=seed, rank=rank, world=world, buffer=buffer,
                         start=start, random_flip=random_flip, bucketed=bucketed, window=window)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGINT to their rank: a scheduler signals the whole process
    group before preemption, and a worker killed by it would crash the rank before the trainer
    saves its checkpoint at the step boundary. The rank stops the workers itself when it exits."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
