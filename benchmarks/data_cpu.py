"""CPU data-path throughput (no GPU needed): shard read, decode + resize, feature-cache read, in samples/s.

Each stage runs in ONE process through the project's own code, so "processes needed" = the rate a
GPU consumes / the rate one process delivers. The GPU rates are docs/references.md section 4 and 3's
measurements on one H100 (not measured by this script), and the project's speed targets:

  stage                                   code                                   consumer
  tar read                                t2i_recap.shards.iter_tar_samples      -
  trainer decode (256 px, [-1,1] tensor)  WebDatasetSource.decode (data.load_image)  on-the-fly DiT training
  captioner decode + CLIP 336 preprocess  captioner.images.decode_image + CLIPImageProcessor  the 8B captioner
  feature-cache read (CLIP-L / T5-XXL)     t2i_recap.cache.CacheSource + data.collate  DiT training from the cache

Synthetic inputs (benchmarks/synthetic.py): 4:3 JPEGs with the long side --image-size, alt-text and
a 49-word recaption per sample; the cache is built by t2i_recap.cache.prepare_cache with random,
shallow encoders of the real widths. Files are read from the OS page cache after a first pass, so
the MB/s column is what the disk or network must deliver to keep up, not what this disk did.

  python benchmarks/data_cpu.py                         # defaults: 512 px JPEGs, 1,000 samples
  python benchmarks/data_cpu.py --samples 64 --image-size 256 --texts clip-tiny  # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
from common import add_output_args, pick_device, report  # noqa: E402

# docs/references.md measurements on one H100 (img/s one GPU consumes), and the project's speed targets.
CONSUMERS = {
    "train": [("DiT-B/4 plain levers, H100 (docs/references.md section 4, measured)", 6867.0),
              ("DiT-B/4 speed target (1.5x plain levers)", 6867.0 * 1.5),
              ("DiT-XL/2 plain levers, H100 (docs/references.md section 4, measured)", 420.0)],
    "caption": [("8B LLaVA plain generate b128, H100 (docs/references.md section 3, measured)", 17.7),
                ("8B LLaVA speed target", 35.0)],
}


def timed(fn: Callable[[], Iterable], min_seconds: float, max_passes: int) -> tuple[int, float]:
    """(items, seconds) over repeated passes of `fn()`, after one untimed pass (warms the page cache)."""
    for _ in fn():
        pass
    items, passes, t0 = 0, 0, time.perf_counter()
    while passes < max_passes and (passes == 0 or time.perf_counter() - t0 < min_seconds):
        items += sum(1 for _ in fn())
        passes += 1
    return items, time.perf_counter() - t0


def stage_tar(paths: list[Path]):
    from t2i_recap.shards import iter_tar_samples

    def run():
        for p in paths:
            yield from iter_tar_samples(p)
    return run


def stage_trainer_decode(shards_dir: Path, resolution: int):
    from t2i_recap.data import DataConfig, Skip, build_source

    source = build_source(DataConfig(shards=str(shards_dir), original_caption="txt", recaption="json:re_caption",
                                     resolution=resolution, image_extensions=["jpg"]))

    def run():
        for i in range(len(source.shards)):
            for rec in source.records(i):
                ex = source.decode(rec)
                if isinstance(ex, Skip):
                    raise RuntimeError(f"synthetic sample {ex.key} failed to decode: {ex.reason}")
                yield ex
    return run


def stage_image_decode(paths: list[Path], resolution: int, draft: bool):
    """t2i_recap.data.load_image's decode + resize + centre crop, with or without the JPEG draft decode
    (images.decode_image(min_side=resolution)): the same work, side by side."""
    import numpy as np
    from PIL import Image, ImageOps

    from t2i_recap.images import decode_image
    from t2i_recap.shards import iter_tar_samples

    def run():
        for p in paths:
            for raw in iter_tar_samples(p):
                img = decode_image(raw.files["jpg"], min_side=resolution if draft else None).image
                img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
                yield torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return run


class GetSliceCache:
    """The feature-cache row read before memory mapping: one safetensors get_slice per tensor per row
    (kept here to measure against; t2i_recap.cache.CacheSource.decode maps the files instead)."""

    def __init__(self, source) -> None:
        self.source, self.shards, self._handles = source, source.shards, {}

    def records(self, index: int):
        return self.source.records(index)

    def decode(self, rec) -> dict:
        from safetensors import safe_open

        index, row = rec.payload
        if index not in self._handles:
            self._handles[index] = safe_open(str(self.source.files[index]), "pt")
        h = self._handles[index]
        out = {name: h.get_slice(name)[row:row + 1][0] for name in h.keys()}
        for name in (k[len("has_"):] for k in h.keys() if k.startswith("has_")):
            out[f"has_{name}"] = out[f"has_{name}"].bool()
            out[f"{name}_truncated"] = out[f"{name}_truncated"].bool()
        if "flagged_recaption" in out:
            out["flagged_recaption"] = out["flagged_recaption"].bool()
        out["key"] = rec.key
        return out


def same_rows(a, b, rows: int = 8) -> None:
    """The two readers return the same tensors (else the comparison would be meaningless)."""
    for rec in list(a.records(0))[:rows]:
        x, y = a.decode(rec), b.decode(rec)
        assert x.keys() == y.keys(), (sorted(x), sorted(y))
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == y[k].dtype and torch.equal(v, y[k]), k


def stage_caption_decode(paths: list[Path], size: int):
    from transformers import CLIPImageProcessor

    from t2i_recap.captioner.images import decode_image
    from t2i_recap.shards import iter_tar_samples

    # LLaVA-1.5's processor: shortest side to 336, centre crop, normalise (what TransformersBackend runs per image).
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def run():
        for p in paths:
            for raw in iter_tar_samples(p):
                img = decode_image(raw.files["jpg"]).image
                yield proc(images=[img], return_tensors="pt")["pixel_values"]
    return run


def stage_cache(source, batch: int):
    """Rows through CacheSource.decode and collate, the way the trainer's loader turns them into batches."""
    from t2i_recap.data import collate

    def run():
        chunk = []
        for i in range(len(source.shards)):
            for rec in source.records(i):
                chunk.append(source.decode(rec))
                if len(chunk) == batch:
                    collate(chunk)
                    yield from chunk
                    chunk = []
        if chunk:
            collate(chunk)
            yield from chunk
    return run


def row_bytes(source) -> int:
    """Bytes one cached sample occupies (every tensor of one row)."""
    ex = source.decode(next(source.records(0)))
    return sum(v.numel() * v.element_size() for v in ex.values() if isinstance(v, torch.Tensor))


def consumer_rows(name: str, kind: str, rate: float, mb: float) -> list[dict]:
    rows = []
    for label, need in CONSUMERS.get(kind, [("-", None)]):
        rows.append({"stage": name, "samples/s (1 process)": rate, "MB/sample": mb, "MB/s": rate * mb,
                     "GPU consumer": label, "consumer img/s": need,
                     "processes needed": None if need is None else need / rate,
                     "consumer MB/s": None if need is None else need * mb})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="synthetic samples (split over --shards)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--image-size", type=int, default=512, help="long side of the synthetic 4:3 JPEGs")
    p.add_argument("--resolution", type=int, default=256, help="training resolution (square crop)")
    p.add_argument("--caption-size", type=int, default=336, help="captioner input size (LLaVA-1.5: 336)")
    p.add_argument("--texts", nargs="+", default=["clip-l", "t5-xxl"], choices=sorted(synthetic.TEXT_ENCODERS),
                   help="text-feature widths of the caches to read")
    p.add_argument("--batch", type=int, default=256, help="rows per collated cache batch")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each stage for at least this long")
    p.add_argument("--max-passes", type=int, default=20, help="... but at most this many passes over the data")
    p.add_argument("--work", default=None, help="folder for shards and caches (default: a temporary one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = a per-process rate)")
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device not in ("auto", "cpu"):
        raise SystemExit("data_cpu.py measures the CPU path; --device must be cpu or auto")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(args.work or tmp)
        shards_dir = work / f"shards-{args.samples}-{args.image_size}"
        paths = synthetic.write_shards(shards_dir, samples=args.samples, shards=args.shards, image_size=args.image_size)
        tar_mb = sum(p.stat().st_size for p in paths) / args.samples / 1e6
        rows = []
        stages = [("tar read (iter_tar_samples)", None, tar_mb, stage_tar(paths)),
                  (f"trainer decode + resize to {args.resolution} px", "train", tar_mb,
                   stage_trainer_decode(shards_dir, args.resolution)),
                  (f"decode_image + fit {args.resolution} px: full decode (before)", "train", tar_mb,
                   stage_image_decode(paths, args.resolution, draft=False)),
                  (f"decode_image + fit {args.resolution} px: JPEG draft (min_side)", "train", tar_mb,
                   stage_image_decode(paths, args.resolution, draft=True)),
                  (f"captioner decode + CLIP {args.caption_size} px preprocess", "caption", tar_mb,
                   stage_caption_decode(paths, args.caption_size))]
        for text in args.texts:
            text_dir, vae_dir = synthetic.write_encoders(work / "encoders", text)
            cache_dir = work / f"cache-{text}-{args.samples}-{args.image_size}"
            source = synthetic.build_cache(shards_dir, text_dir, vae_dir, cache_dir, resolution=args.resolution)
            _, width, tokens = synthetic.TEXT_ENCODERS[text]
            old = GetSliceCache(source)
            same_rows(source, old)
            stages.append((f"feature-cache read, {text} {tokens}x{width} fp16: get_slice (before)", "train",
                           row_bytes(source) / 1e6, stage_cache(old, args.batch)))
            stages.append((f"feature-cache read, {text} {tokens}x{width} fp16: memory-mapped", "train",
                           row_bytes(source) / 1e6, stage_cache(source, args.batch)))
        for name, kind, mb, fn in stages:
            items, sec = timed(fn, args.min_seconds, args.max_passes)
            rows.extend(consumer_rows(name, kind, items / sec, mb))
    notes = [f"{args.samples} synthetic samples, 4:3 JPEG q90 with long side {args.image_size} px "
             f"({tar_mb * 1e3:.0f} kB/sample in the tar); one process, {args.threads} torch thread(s).",
             "Consumer rates are the reference H100 measurements or the project's speed targets, not measured here.",
             "processes needed = consumer img/s / samples/s of one process (DataLoader workers, or ranks' share)."]
    columns = ["stage", "samples/s (1 process)", "MB/sample", "MB/s", "GPU consumer", "consumer img/s",
               "processes needed", "consumer MB/s"]
    report("CPU data path", rows, columns, args, pick_device("cpu"),
           digits={"MB/sample": 3, "processes needed": 2}, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
