"""Aspect-ratio buckets: every image trains at the bucket size nearest its shape, not a square crop.

The bins are PixArt's (Chen et al., PixArt-alpha, multi-aspect training; the tables ship in
diffusers as `ASPECT_RATIO_{256,512,1024}_BIN` in `diffusers.pipelines.pixart_alpha`): about 33-40
(height, width) pairs of roughly `base x base` pixels, aspect ratios 0.25 to 4. For a training
resolution R the table of the nearest base is scaled by R / base and each side rounded to a multiple
of the latent patch (VAE downsampling x DiT patch size), so every bin is a whole number of tokens.

An image goes to the bin whose aspect ratio is nearest its own in log space (its size read from the
file header, EXIF orientation applied, as `t2i_recap.images.decode_image` applies it); it is resized
to cover the bin and centre-cropped by the few pixels of aspect the bin does not match, so the
subject stays in frame. Each micro-batch is drawn from one bin (`BucketBatcher`); samples left in a
bin too small for a micro-batch at the end of an epoch are counted, not trained that epoch.
"""

from __future__ import annotations

import io
import math
from typing import Callable, Iterator

from PIL import Image

from t2i_recap.images import ORIENTATION_TAG

_BASES = (256, 512, 1024)


def pixart_table(base: int) -> dict[str, list[float]]:
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN,
                                                                         ASPECT_RATIO_512_BIN,
                                                                         ASPECT_RATIO_1024_BIN)

    return {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}[base]


def bucket_table(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width) in pixels of every bucket for a training `resolution`, each side a multiple of
    `multiple` (the latent patch in pixels), sorted by aspect ratio; the square bin is always there."""
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"data.resolution={resolution} must be a multiple of the latent patch ({multiple} px: VAE "
                         "downsampling x DiT patch size) to bucket it")
    base = min(_BASES, key=lambda b: abs(math.log(resolution / b)))
    scale = resolution / base
    sizes = {(resolution, resolution)}
    for h, w in pixart_table(base).values():
        sh, sw = (max(multiple, multiple * round(side * scale / multiple)) for side in (h, w))
        sizes.add((sh, sw))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, table: list[tuple[int, int]]) -> int:
    """Index of the bin whose aspect ratio (h / w) is nearest the image's, in log space; ties go to
    the bin with the area nearest the image's."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} has no aspect ratio")
    ratio = math.log(height / width)
    return min(range(len(table)), key=lambda i: (round(abs(math.log(table[i][0] / table[i][1]) - ratio), 9),
                                                 abs(table[i][0] * table[i][1] - width * height)))


def header_size(data: bytes | str) -> tuple[int, int] | None:
    """(width, height) of an encoded image (its bytes, or a local file path) as shown upright (EXIF
    orientations 5-8 swap the sides), read from its header without decoding pixels; None when the
    header does not parse (the sample's decode then reports why)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return upright_size(img)
    except Exception:  # noqa: BLE001 - a hostile header; decode_image gives the reason
        return None


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    w, h = img.size
    return (h, w) if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8) else (w, h)


class BucketBatcher:
    """Groups a record stream into micro-batches that each hold one bucket.

    `stream` yields (cursor, record) with cursor = (epoch, offset), as `t2i_recap.data.rank_records`;
    `bucket_of(record)` gives its bin index (None: its size is unknown; it is passed on alone so the
    decode records why). Yields (epoch, bin, [(cursor, record), ...]) per full bin, and at each epoch
    end ("remainder", epoch, n) with the samples left in bins that did not fill a micro-batch.

    Deterministic for a given stream, so a run resumes by replaying its epoch from the start and
    skipping the batches it trained (`skip_batches`): only headers are read on the way."""

    def __init__(self, stream: Iterator, bucket_of: Callable, batch_size: int) -> None:
        self.stream, self.bucket_of, self.batch_size = stream, bucket_of, batch_size

    def __iter__(self) -> Iterator[tuple]:
        queues: dict[int | None, list] = {}
        epoch = None
        for cursor, rec in self.stream:
            if epoch is not None and cursor[0] != epoch:
                yield "remainder", epoch, sum(len(q) for q in queues.values())
                queues = {}
            epoch = cursor[0]
            b = self.bucket_of(rec)
            if b is None:
                yield epoch, None, [(cursor, rec)]
                continue
            q = queues.setdefault(b, [])
            q.append((cursor, rec))
            if len(q) == self.batch_size:
                yield epoch, b, q
                queues[b] = []


def latent_patch(cfg, encoder) -> int:
    """The latent patch of a run in pixels: VAE downsampling x the DiT's patch size (DiT-B/4: 4)."""
    return encoder.downsample * int(cfg.model.name.rsplit("/", 1)[1])


def enable_buckets(cfg, encoder, source) -> list[tuple[int, int]] | None:
    """With cfg.data.aspect_buckets: the bucket table of this run (each side a multiple of the latent
    patch, VAE downsampling x DiT patch size, or of data.bucket_multiple), set on the feature encoder
    (it is part of the cache's fingerprint) and on the raw data source; None without buckets."""
    if not cfg.data.aspect_buckets:
        return None
    unit = latent_patch(cfg, encoder)
    multiple = cfg.data.bucket_multiple or unit
    if multiple % unit:
        raise ValueError(f"data.bucket_multiple={multiple} is not a multiple of the latent patch ({unit} px: VAE "
                         f"downsampling {encoder.downsample} x the patch of {cfg.model.name})")
    table = bucket_table(cfg.data.resolution, multiple)
    encoder.buckets = source.buckets = table
    return table
