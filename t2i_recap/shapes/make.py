"""`t2i-recap shapes make`: write shapes-world shards in img2dataset's webdataset layout.

Per shard (docs/references.md section 2): `00000.tar` holding `<key>.png|jpg`, `<key>.txt` (the noisy
web caption) and `<key>.json` (img2dataset's metadata plus the scene graph, and the gold caption
for the curated share), then `00000.parquet` with the same metadata, then `00000_stats.json`
last: as in img2dataset, its presence marks the shard done and a rerun skips it.

Every sample comes from its own RNG seeded by (split, seed, index), so the shard size, the
number of samples and the number of workers never change a sample; the same arguments give the
same bytes (tar members have fixed times and owners, PNGs carry no timestamps).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import random
import sys
import tarfile
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.io import atomic_path, atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.shapes.captions import gold_caption, web_caption
from t2i_recap.shapes.render import render
from t2i_recap.shapes.world import Scene, sample_scene

log = get_logger(__name__)

MAX_SHARD_SIZE = 10_000  # img2dataset keys hold a 4-digit index within the shard
MAX_SHARDS = 100_000  # ... and a 5-digit shard id
IMAGE_FORMATS = ("png", "jpg")

PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
    ("scene", pa.string()), ("gold_caption", pa.string()), ("curated", pa.bool_()),
    ("gold_captions", pa.list_(pa.string())),
])


@dataclasses.dataclass(frozen=True)
class MakeArgs:
    """What decides a dataset's content; recorded in every shard's _stats.json and checked on rerun."""

    seed: int = 0
    split: str = "train"
    curated_fraction: float = 0.1
    resolution: int = 32
    shard_size: int = 1000
    image_format: str = "png"
    jpeg_quality: int = 95
    gold_captions: int = 1
    """Gold captions per curated sample (as COCO has 5 per image): the first is `gold_caption`, the
    others other wordings of the same scene, listed in `gold_captions`."""

    def __post_init__(self) -> None:
        if self.gold_captions < 1:
            raise ValueError(f"gold_captions must be >= 1, got {self.gold_captions}")
        if not 0.0 <= self.curated_fraction <= 1.0:
            raise ValueError(f"curated_fraction must be in [0, 1], got {self.curated_fraction}")
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise ValueError(f"shard_size must be in 1..{MAX_SHARD_SIZE} (4-digit key index), got {self.shard_size}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.resolution < 12:
            raise ValueError(f"resolution must be at least 12, got {self.resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not self.split or not all(c.isalnum() or c in "-_" for c in self.split):
            raise ValueError(f"split must be a non-empty name of letters, digits, '-' and '_', got {self.split!r}")


@dataclasses.dataclass(frozen=True)
class ShapesSample:
    """One sample's content, independent of how the dataset is sharded."""

    index: int
    scene: Scene
    web_caption: str
    gold_caption: str
    curated: bool
    more_gold: tuple[str, ...] = ()
    """Further gold wordings of the scene (MakeArgs.gold_captions - 1 of them)."""


def is_curated(index: int, fraction: float) -> bool:
    """Spread the curated share evenly: exactly floor(n * fraction) of the first n samples."""
    return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


def make_sample(index: int, seed: int = 0, split: str = "train", curated_fraction: float = 0.1,
                gold_captions: int = 1) -> ShapesSample:
    """The sample at `index`; a string seed makes Python's RNG hash it with SHA-512, stable everywhere.
    Extra gold wordings come from their own streams, so asking for them changes nothing else."""
    base = f"t2i-recap/shapes/{split}/{seed}/{index}"
    rng = random.Random(base)
    scene = sample_scene(rng)
    web = web_caption(scene, rng)
    gold = gold_caption(scene, rng)  # drawn for every sample so the curated share changes nothing else
    curated = is_curated(index, curated_fraction)
    more = tuple(gold_caption(scene, random.Random(f"{base}/gold/{j}")) for j in range(1, gold_captions)) if curated else ()
    return ShapesSample(index, scene, web, gold, curated, more)


def _encode(scene: Scene, args: MakeArgs) -> bytes:
    buf = io.BytesIO()
    image = render(scene, args.resolution)
    if args.image_format == "png":
        image.save(buf, format="PNG")
    else:  # 4:4:4 chroma: at 32 px, 4:2:0 subsampling smears a small shape's colour
        image.save(buf, format="JPEG", quality=args.jpeg_quality, subsampling=0)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_record(sample: ShapesSample, key: str, image: bytes, args: MakeArgs) -> dict:
    return {
        "key": key,
        "caption": sample.web_caption,
        "url": f"shapes://{args.split}/{args.seed}/{sample.index:09d}",
        "status": "success",
        "error_message": None,
        "width": args.resolution,
        "height": args.resolution,
        "original_width": args.resolution,
        "original_height": args.resolution,
        "sha256": hashlib.sha256(image).hexdigest(),
        "scene": sample.scene.to_dict(),
        # Present (null / false) in every sample so readers that infer a schema see one.
        "gold_caption": sample.gold_caption if sample.curated else None,
        "curated": sample.curated,
        "gold_captions": [sample.gold_caption, *sample.more_gold] if sample.curated else None,
    }


def _shard_range(shard: int, num: int, args: MakeArgs) -> range:
    start = shard * args.shard_size
    return range(start, min(num, start + args.shard_size))


def write_shard(out: Path, shard: int, num: int, args: MakeArgs, progress=None) -> int:
    """Write one shard (tar, parquet, then _stats.json); returns its sample count."""
    indices = _shard_range(shard, num, args)
    rows = []
    with atomic_path(out / f"{shard:05d}.tar") as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in indices:
            sample = make_sample(index, args.seed, args.split, args.curated_fraction, args.gold_captions)
            key = f"{shard:05d}{index - indices.start:04d}"
            image = _encode(sample.scene, args)
            record = _sample_record(sample, key, image, args)
            _add_member(tar, f"{key}.{args.image_format}", image)
            _add_member(tar, f"{key}.txt", sample.web_caption.encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(record).encode("utf-8"))
            rows.append(record | {"scene": json.dumps(record["scene"])})
            if progress is not None:
                progress.update(1)
    with atomic_path(out / f"{shard:05d}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), tmp)
    n = len(indices)
    stats = {  # img2dataset's fields (no timings, so reruns give identical bytes) + our arguments
        "count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
        "status_dict": {"success": n}, "shard": f"{shard:05d}", "args": dataclasses.asdict(args),
    }
    atomic_write_text(out / f"{shard:05d}_stats.json", json.dumps(stats, indent=2) + "\n")
    return n


def _shard_done(out: Path, shard: int, num: int, args: MakeArgs) -> bool:
    """True when a finished shard with this content exists; raises if it was made differently."""
    stats_path = out / f"{shard:05d}_stats.json"
    if not stats_path.exists():
        return False
    stats = json.loads(stats_path.read_text())
    # A field missing from the record was added later: its default is what made that shard.
    recorded = dataclasses.asdict(MakeArgs()) | stats.get("args", {})
    differing = {k: (recorded.get(k), v) for k, v in dataclasses.asdict(args).items() if recorded.get(k) != v}
    if differing:
        details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
        raise ValueError(f"{stats_path} was made with other arguments ({details}); "
                         "use a new --out folder or delete its shards")
    missing = [p.name for p in (out / f"{shard:05d}.tar", out / f"{shard:05d}.parquet") if not p.exists()]
    if missing:
        log.warning("%s exists but %s is missing; rewriting the shard", stats_path.name, ", ".join(missing))
        return False
    if stats.get("count") != len(_shard_range(shard, num, args)):
        log.info("shard %05d holds %s samples, %d wanted; rewriting it", shard, stats.get("count"),
                 len(_shard_range(shard, num, args)))
        return False
    return True


def _write_shard_job(job: tuple[str, int, int, MakeArgs]) -> int:
    out, shard, num, args = job
    return write_shard(Path(out), shard, num, args)


def make_dataset(out: str | Path, num: int, seed: int = 0, *, curated_fraction: float = 0.1,
                 resolution: int = 32, shard_size: int = 1000, image_format: str = "png",
                 split: str = "train", jpeg_quality: int = 95, workers: int = 1,
                 progress: bool = True, gold_captions: int = 1) -> dict:
    """Write `num` samples as shards under `out`; finished shards are skipped. Returns a summary."""
    args = MakeArgs(seed, split, curated_fraction, resolution, shard_size, image_format, jpeg_quality, gold_captions)
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    num_shards = math.ceil(num / shard_size)
    if num_shards > MAX_SHARDS:
        raise ValueError(f"{num} samples need {num_shards} shards of {shard_size}; keys allow {MAX_SHARDS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in range(num_shards) if not _shard_done(out, s, num, args)]
    _warn_extra_shards(out, num_shards)
    remaining = sum(len(_shard_range(s, num, args)) for s in todo)
    with tqdm(total=remaining, unit="img", desc="shapes make", disable=not progress) as bar:
        if workers <= 1:
            for shard in todo:
                write_shard(out, shard, num, args, progress=bar)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for n in pool.map(_write_shard_job, [(str(out), s, num, args) for s in todo]):
                    bar.update(n)
    summary = {"out": str(out), "num": num, "shards": num_shards, "written_shards": len(todo),
               "skipped_shards": num_shards - len(todo),
               "curated": sum(is_curated(i, curated_fraction) for i in range(num))}
    log.info("shapes make: %s", summary)
    return summary


def _warn_extra_shards(out: Path, num_shards: int) -> None:
    extra = sorted(p.name for p in out.glob("*_stats.json") if p.name[:5].isdigit() and int(p.name[:5]) >= num_shards)
    if extra:
        log.warning("%s holds finished shards past the %d asked for (%s...); left as they are",
                    out, num_shards, extra[0])


@dataclasses.dataclass
class MakeConfig:
    """What `t2i-recap shapes make` writes (its flags, or --config / --set)."""

    out: str = ""
    """Output folder for the shards."""
    num: int | None = None
    """Number of samples."""
    seed: int = 0
    """Base seed (default 0)."""
    curated_fraction: float = 0.1
    """Share of samples that also carry a gold dense caption (default 0.1)."""
    gold_captions: int = 1
    """Gold captions per curated sample, in other wordings (default 1; COCO has 5)."""
    resolution: int = 32
    """Image side in pixels (default 32)."""
    shard_size: int = 1000
    """Samples per shard (at most 10000)."""
    image_format: typing.Literal["png", "jpg"] = "png"
    """Image file format inside the tars."""
    jpeg_quality: int = 95
    """JPEG quality when the image format is jpg."""
    split: str = "train"
    """Split name; different splits of one seed hold different samples."""
    workers: int = 1
    """Processes writing shards in parallel."""
    progress: bool = True
    """A progress bar on stderr; `--no-progress` hides it."""


FLAGS = {"--out": "out", "--num": "num", "--seed": "seed", "--curated-fraction": "curated_fraction",
         "--gold-captions": "gold_captions", "--resolution": "resolution", "--shard-size": "shard_size",
         "--image-format": "image_format", "--jpeg-quality": "jpeg_quality", "--split": "split",
         "--workers": "workers", "--no-progress": "progress"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap shapes make",
                                description="Write shapes-world shards in img2dataset's webdataset layout.")
    add_config_arguments(p, MakeConfig, FLAGS, required=("--out", "--num"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    setup_logging()
    try:
        cfg = config_from_args(MakeConfig, parser.parse_args(argv))
        summary = make_dataset(cfg.out, cfg.num, cfg.seed, curated_fraction=cfg.curated_fraction,
                               resolution=cfg.resolution, shard_size=cfg.shard_size,
                               image_format=cfg.image_format, split=cfg.split,
                               jpeg_quality=cfg.jpeg_quality, workers=cfg.workers,
                               progress=cfg.progress, gold_captions=cfg.gold_captions)
    except ValueError as exc:  # ConfigError included
        parser.error(str(exc))
    print(f"wrote {summary['num']} samples ({summary['curated']} curated) in {summary['shards']} shards to "
          f"{summary['out']} ({summary['skipped_shards']} already finished)", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
