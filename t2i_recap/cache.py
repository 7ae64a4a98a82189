"""Features for training: VAE latents (or moments) and text embeddings of BOTH captions, plus the cache.

`FeatureEncoder` turns a batch of images + captions into features; training on the fly and
`t2i-recap prepare` use the same code, and the on-the-fly path rounds features to the cache's
storage dtype, so a run from the cache and a run on the fly see the same numbers.

The cache holds one safetensors file per input shard, `<shard id>.safetensors` (rows in shard
order, keyed by sample key in the file's metadata) plus `empty.safetensors` (the empty caption, for
CFG dropout). Every file records the fingerprint it was built with (the VAE's and text encoder's
content digests, resolution, dtype, token length, caption fields) and its input: the shard's and
sidecar's size and mtime, and their content digests. A file whose fingerprint changed is stale;
one whose inputs' size or mtime changed is stale unless their content is still the same (the same
shards copied elsewhere are recognised). Stale files are rebuilt, never reused. Mixing and CFG
dropout are applied at train time, never baked in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from t2i_recap.claims import Claims
from t2i_recap.data import DataConfig, Record, Skip, collate
from t2i_recap.identity import model_digest
from t2i_recap.io import atomic_path, check_model_source
from t2i_recap.logging_utils import get_logger
from t2i_recap.storage import is_url
from t2i_recap.text_encoders import DTYPES, TextEncoder, TextEncoderConfig

log = get_logger(__name__)
CACHE_VERSION = 2
CAPTIONS = ("original", "recaption")


@dataclasses.dataclass
class FeaturesConfig:
    vae: str = "stabilityai/sd-vae-ft-ema"
    """Hub id or local folder of the AutoencoderKL (its config's scaling_factor is used)."""
    vae_subfolder: str = ""
    """Subfolder of the VAE inside `vae` (e.g. "vae" in a pipeline repo)."""
    vae_revision: str | None = None
    """Hub revision of the VAE."""
    vae_dtype: str = "float32"
    """dtype the VAE runs in."""
    latents: Literal["moments", "mean"] = "moments"
    """Store the posterior's mean and log-variance (sampled anew each step, as PixArt) or its mean only."""
    dtype: str = "float16"
    """Storage dtype of cached features (the on-the-fly path rounds to it too)."""
    cache_dir: str | None = None
    """Feature cache folder; set = train from the cache (stale or missing shards are rebuilt first). A local
    (or shared POSIX) folder: its safetensors files are memory-mapped. The shards it is built from may be
    in an object store (data.shards, data.recaption_dir as s3://, http(s)://, hf:// URLs)."""
    encode_batch_size: int = 64
    """Images per encoder batch in `prepare`."""

    def __post_init__(self) -> None:
        for name in ("vae_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {list(DTYPES)}, got {getattr(self, name)!r}")
        if self.encode_batch_size < 1:
            raise ValueError("encode_batch_size must be >= 1")
        if is_url(self.cache_dir):
            raise ValueError(f"features.cache_dir={self.cache_dir!r}: the feature cache is memory-mapped and must be "
                             "a local or shared POSIX folder; the shards and sidecars may stay in the object store")


class FeatureEncoder:
    """The frozen VAE and text encoder, loaded once per process."""

    def __init__(self, cfg: FeaturesConfig, text_cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        kw = {"revision": cfg.vae_revision} if cfg.vae_revision else {}
        sub = {"subfolder": cfg.vae_subfolder} if cfg.vae_subfolder else {}
        check_model_source(cfg.vae, "features.vae")
        self.vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=DTYPES[cfg.vae_dtype], **sub, **kw).to(device).eval()
        self.vae.requires_grad_(False)
        self.text = TextEncoder(text_cfg, device)
        self.store_dtype = DTYPES[cfg.dtype]
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.buckets: list[tuple[int, int]] | None = None  # data.aspect_buckets: t2i_recap.buckets.enable_buckets

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def fingerprint(self, data: DataConfig) -> dict:
        return {
            "version": CACHE_VERSION,
            "vae": model_identity(self.cfg.vae, self.cfg.vae_subfolder, self.cfg.vae_revision),
            "vae_dtype": self.cfg.vae_dtype,
            "latents": self.cfg.latents,
            "dtype": self.cfg.dtype,
            "text_encoder": self._text_identity(),
            "resolution": data.resolution,
            "captions": data.caption_fingerprint(),
            "image_extensions": data.image_extensions,
            **({"aspect_buckets": [list(b) for b in self.buckets]} if self.buckets else {}),
        }

    def _text_identity(self) -> dict:
        t = self.text.cfg
        out = {"max_length": self.text.max_length, "dtype": t.dtype, "model_type": self.text.model_type,
               **model_identity(t.name_or_path, t.subfolder, t.revision)}
        if t.tokenizer_subfolder or t.subfolder:  # the tokenizer lives elsewhere in the folder
            out["tokenizer"] = model_identity(t.name_or_path, t.tokenizer_subfolder, t.revision)
        return out

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        out = {"mean": dist.mean}
        if self.cfg.latents == "moments":
            out["logvar"] = dist.logvar
        return {k: v.to(self.store_dtype).cpu() for k, v in out.items()}

    def encode_captions(self, texts: list[str | None], name: str) -> dict[str, torch.Tensor]:
        emb, mask, truncated = self.text.encode([t or "" for t in texts])
        has = torch.tensor([t is not None for t in texts])
        emb = emb.to(self.store_dtype).cpu() * has.view(-1, 1, 1)  # missing captions store zeros
        return {f"{name}_emb": emb, f"{name}_mask": mask.to(torch.uint8).cpu() * has.view(-1, 1),
                f"{name}_truncated": truncated & has, f"has_{name}": has}

    def encode_batch(self, batch: dict, names=CAPTIONS) -> dict[str, torch.Tensor]:
        """Features of a decoded batch (pixels + every named caption), as the cache stores them."""
        out = self.encode_images(batch["pixels"])
        for name in names:
            out.update(self.encode_captions(batch[name], name))
        if "flagged_recaption" in batch:  # data.flagged_recaptions: counted at train time
            out["flagged_recaption"] = batch["flagged_recaption"]
        return out

    def empty(self) -> dict[str, torch.Tensor]:
        emb, mask, _ = self.text.encode([""])
        return {"emb": emb.to(self.store_dtype).cpu(), "mask": mask.to(torch.uint8).cpu()}


def latents_from(features: dict, generator: torch.Generator, scaling: float, shift: float = 0.0) -> torch.Tensor:
    """Scaled latents x0 from cached moments (sampled, like VAE training saw) or the stored mean."""
    mean = features["mean"].float()
    if "logvar" in features:
        std = torch.exp(0.5 * features["logvar"].float().clamp(-30.0, 20.0))
        mean = mean + std * torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
    return (mean - shift) * scaling


def model_identity(name_or_path: str, subfolder: str = "", revision: str | None = None) -> dict:
    """A local model by its content digest (never its path: the same files elsewhere are the same
    model, files re-saved in place are another); a hub model by id, subfolder and revision."""
    path = Path(name_or_path).expanduser() / subfolder
    if path.exists():
        return {"digest": model_digest(path)}
    return {"id": name_or_path, "subfolder": subfolder, "revision": revision}


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _shard_file(cache_dir: Path, shard: str) -> Path:
    """`shard` is the source's shard id (`t2i_recap.shards.shard_id` for tar shards)."""
    return cache_dir / f"{shard}.safetensors"


def shard_is_fresh(path: Path, fp_hash: str, stat: dict, content=None) -> bool:
    """True if the cache file at `path` was built with `fp_hash` from the same input.

    `stat` (sizes and mtimes) equal: the same input. Otherwise `content()` (digests) decides.
    """
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged file is simply stale
        return False
    if meta.get("fingerprint") != fp_hash:
        return False
    if meta.get("source") == json.dumps(stat, sort_keys=True):
        return True
    return content is not None and meta.get("content") == json.dumps(content(), sort_keys=True)


def _batches(source, index: int, size: int, stats: dict) -> Iterator[tuple[list[int], int | None, dict]]:
    """(row positions in shard order, aspect bucket or None, collated batch); with aspect buckets
    each batch holds one bucket's samples, decoded at its size."""
    buckets = getattr(source, "buckets", None)
    chunks: dict[int | None, list] = {}
    for pos, rec in enumerate(source.records(index)):
        b = source.bucket_of(rec) if buckets else None
        ex = source.decode(rec, buckets[b]) if b is not None else source.decode(rec)
        if isinstance(ex, Skip):
            log.warning("cache: skipping sample %s of %s: %s", ex.key, ex.shard, ex.reason)
            stats["skipped"] += 1
            continue
        if buckets and b is None:
            raise RuntimeError(f"sample {rec.key} of {rec.shard}: its image header gives no size, yet it decodes")
        chunk = chunks.setdefault(b, [])
        chunk.append((pos, ex))
        if len(chunk) == size:
            yield [p for p, _ in chunk], b, collate([e for _, e in chunk])
            chunks[b] = []
    for b, chunk in chunks.items():
        if chunk:
            yield [p for p, _ in chunk], b, collate([e for _, e in chunk])


LATENTS = ("mean", "logvar")


def _bucketed_tensors(parts: list[tuple[list[int], int, dict]], buckets: list[tuple[int, int]]) -> dict:
    """One file's tensors with aspect buckets: the latents of each bucket stacked as `mean@HxW` (and
    `logvar@HxW`), every other tensor one row per sample in shard order, plus `bucket` (the row's
    bucket index) and `bucket_row` (its row in that bucket's latents)."""
    positions = torch.tensor([p for pos, _, _ in parts for p in pos])
    order = torch.argsort(positions)
    bucket = torch.tensor([b for pos, b, _ in parts for _ in pos], dtype=torch.int32)
    bucket_row = torch.empty(len(positions), dtype=torch.int32)
    filled: dict[int, int] = {}
    start = 0
    for pos, b, _ in parts:
        bucket_row[start:start + len(pos)] = torch.arange(filled.get(b, 0), filled.get(b, 0) + len(pos))
        filled[b] = filled.get(b, 0) + len(pos)
        start += len(pos)
    out = {k: torch.cat([f[k] for _, _, f in parts])[order].contiguous() for k in parts[0][2] if k not in LATENTS}
    out.update(bucket=bucket[order].contiguous(), bucket_row=bucket_row[order].contiguous())
    for k in (k for k in LATENTS if k in parts[0][2]):
        for b in sorted(filled):
            h, w = buckets[b]
            out[f"{k}@{h}x{w}"] = torch.cat([f[k] for _, pb, f in parts if pb == b]).contiguous()
    return out


def build_shard(encoder: FeatureEncoder, source, index: int, path: Path, fp_hash: str) -> dict:
    """Encode one input shard and write its cache file atomically; returns its counts."""
    names = getattr(source, "caption_names", CAPTIONS)
    stats = {"rows": 0, "skipped": 0, **{f"{name}_truncated": 0 for name in names}}
    before, content = source.shard_stat(index), source.shard_content(index)
    buckets = getattr(source, "buckets", None)
    keys: dict[int, str] = {}
    parts: list[tuple[list[int], int | None, dict]] = []
    for positions, b, batch in _batches(source, index, encoder.cfg.encode_batch_size, stats):
        feats = encoder.encode_batch(batch, names)
        keys.update(zip(positions, batch["key"]))
        parts.append((positions, b, feats))
        for name in names:
            stats[f"{name}_truncated"] += int(feats[f"{name}_truncated"].sum())
    stats["rows"] = len(keys)
    if not parts:
        raise RuntimeError(f"shard {source.shards[index]} has no usable samples; cannot cache it")
    if buckets:
        tensors = _bucketed_tensors(parts, buckets)
    else:
        tensors = {k: torch.cat([f[k] for _, _, f in parts]).contiguous() for k in parts[0][2]}
    tensors = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v) for k, v in tensors.items()}
    if source.shard_stat(index) != before:
        raise RuntimeError(f"shard {source.shards[index]} (or its sidecar) changed while its features were "
                           "computed (still being written?); run again once it is complete")
    meta = {"fingerprint": fp_hash, "source": json.dumps(before, sort_keys=True),
            "content": json.dumps(content, sort_keys=True),
            "keys": json.dumps([keys[p] for p in sorted(keys)]), "stats": json.dumps(stats),
            **({"buckets": json.dumps([list(b) for b in buckets])} if buckets else {})}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return stats


def write_fingerprint(encoder: FeatureEncoder, data: DataConfig, cache_dir: Path) -> str:
    """Write fingerprint.json and empty.safetensors (rewritten when the fingerprint changes)."""
    fp = encoder.fingerprint(data)
    fp_hash = fingerprint_hash(fp)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp_file = cache_dir / "fingerprint.json"
    if fp_file.is_file():
        old = json.loads(fp_file.read_text())
        if old.get("hash") != fp_hash:
            log.warning("feature cache %s was built with a different fingerprint; every shard will be rebuilt "
                        "(old %s, new %s)", cache_dir, old.get("hash"), fp_hash)
    empty = encoder.empty()
    with atomic_path(cache_dir / "empty.safetensors", suffix=".safetensors") as tmp:
        save_file(empty, str(tmp), metadata={"fingerprint": fp_hash})
    with atomic_path(fp_file) as tmp:
        tmp.write_text(json.dumps({"hash": fp_hash, "fingerprint": fp}, indent=2, sort_keys=True))
    return fp_hash


def prepare_cache(encoder: FeatureEncoder, source, data: DataConfig, cache_dir: str | Path, *,
                  rank: int = 0, world: int = 1, fp_hash: str | None = None, claims: Claims | None = None) -> dict:
    """Build the missing or stale shard files of this rank (shards[rank::world]); returns a summary.

    With `claims`, each shard is built under a claim, so overlapping processes never build one twice."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp_hash = fp_hash or fingerprint_hash(encoder.fingerprint(data))
    summary = {"built": 0, "fresh": 0, "rows": 0, "skipped": 0}
    mine = list(range(len(source.shards)))[rank::world]

    def fresh(i: int) -> bool:
        path = _shard_file(cache_dir, source.shards[i])
        return shard_is_fresh(path, fp_hash, source.shard_stat(i), lambda: source.shard_content(i))

    claimed = claims.each(mine, lambda i: source.shards[i], fresh) if claims is not None else None
    order = (i for i, _ in claimed) if claimed is not None else mine
    try:
        for i in tqdm(order, desc="prepare", unit="shard", disable=rank != 0):
            path = _shard_file(cache_dir, source.shards[i])
            if claims is None and fresh(i):
                summary["fresh"] += 1
                continue
            if path.exists():
                log.info("cache shard %s is stale; rebuilding", path.name)
            stats = build_shard(encoder, source, i, path, fp_hash)
            summary["built"] += 1
            summary["rows"] += stats["rows"]
            summary["skipped"] += stats["skipped"]
    finally:
        if claimed is not None:
            claimed.close()  # releases the claim in hand if a shard failed
    if claims is not None:
        claims.prune()
        summary["fresh"] = len(claims.finished_elsewhere)  # fresh at the start, or built by another process
    return summary


class CacheSource:
    """Cached features as a data source with the same shard names and record order as the raw source."""

    def __init__(self, cache_dir: str | Path, shards: list[str], fp_hash: str) -> None:
        self.dir = Path(cache_dir)
        self.shards = list(shards)
        self.fp_hash = fp_hash
        self.files = [_shard_file(self.dir, s) for s in self.shards]
        self._keys: dict[int, list[str]] = {}
        self._handles: dict[int, object] = {}
        self.buckets: list[tuple[int, int]] | None = None  # data.aspect_buckets: the (height, width) bins
        for f in self.files:
            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
                if meta.get("fingerprint") != fp_hash:
                    raise RuntimeError(f"cache file {f} does not match the current fingerprint; run t2i-recap prepare")
                if "buckets" in meta:  # the fingerprint holds the table, so every file has the same one
                    self.buckets = [tuple(b) for b in json.loads(meta["buckets"])]

    def keys(self, index: int) -> list[str]:
        if index not in self._keys:
            with safe_open(str(self.files[index]), "pt") as h:
                self._keys[index] = json.loads(h.metadata()["keys"])
        return self._keys[index]

    def records(self, index: int) -> Iterator[Record]:
        for row, key in enumerate(self.keys(index)):
            yield Record(self.shards[index], key, (index, row))

    def _mapped(self, index: int) -> dict:
        if index not in self._handles:  # mapped lazily, per process (DataLoader workers)
            self._handles[index] = mmap_tensors(self.files[index])
        return self._handles[index]

    def bucket_of(self, rec: Record) -> int:
        index, row = rec.payload
        return int(self._mapped(index)["bucket"][0][row])

    def decode(self, rec: Record, size: tuple[int, int] | None = None) -> dict:
        """A cached row; `size` is not used (with aspect buckets the latents are stored at their bucket's size)."""
        index, row = rec.payload
        mapped = self._mapped(index)
        if "bucket" in mapped:
            h, w = self.buckets[int(mapped["bucket"][0][row])]
            brow = int(mapped["bucket_row"][0][row])
            out = {name: row_of(arr, dtype, brow) for name in LATENTS if f"{name}@{h}x{w}" in mapped
                   for arr, dtype in [mapped[f"{name}@{h}x{w}"]]}
            out.update({name: row_of(arr, dtype, row) for name, (arr, dtype) in mapped.items()
                        if "@" not in name and name not in ("bucket", "bucket_row")})
        else:
            out = {name: row_of(arr, dtype, row) for name, (arr, dtype) in mapped.items()}
        for name in [k[len("has_"):] for k in out if k.startswith("has_")]:
            out[f"has_{name}"] = out[f"has_{name}"].bool()
            out[f"{name}_truncated"] = out[f"{name}_truncated"].bool()
        if "flagged_recaption" in out:
            out["flagged_recaption"] = out["flagged_recaption"].bool()
        out["key"] = rec.key
        return out


_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def mmap_tensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a safetensors file as a memory map, by name -> (array, dtype name).

    The format (huggingface/safetensors README): an 8-byte little-endian header size, a JSON header
    of {name: {dtype, shape, data_offsets}}, then the raw little-endian data. A row read is then a
    numpy view per tensor, no library call and no copy (get_slice copies each row; the batch's
    collate copies it again). Copy-on-write ("c"): a caller writing into a row changes its own
    private page, never the file, and cannot fault on a read-only page."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _NUMPY:
            raise ValueError(f"cache file {path}: tensor {name} has dtype {info['dtype']}, which the reader does not map")
        begin, end = info["data_offsets"]
        out[name] = (data[begin:end].view(_NUMPY[info["dtype"]]).reshape(info["shape"]), info["dtype"])
    return out


def row_of(arr: np.ndarray, dtype: str, row: int) -> torch.Tensor:
    """Row `row` of a mapped tensor, as a view of the map (`[row, ...]` keeps a 0-d row an array)."""
    t = torch.from_numpy(arr[row, ...])
    return t.view(torch.bfloat16) if dtype == "BF16" else t


def load_empty(cache_dir: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(cache_dir) / "empty.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
