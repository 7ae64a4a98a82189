"""Score one prompt variant's images with every configured metric.

Per-image metrics (oracle, CLIP score, VQA) become rows; set-level metrics (FID, FD-CLIP, CMMD)
accumulate over the variant's images and are computed once against the reference images.
Images are read in chunks, so a 30K-prompt suite never sits in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from t2i_recap.logging_utils import get_logger

from . import metric_oracle
from .generate import image_path, image_seed
from .protocol import Variant
from .suites import Suite

log = get_logger(__name__)
CHUNK = 256  # images held in memory at once while scoring


@dataclass
class Scorers:
    """The metric models, loaded once for all variants (None = metric not requested)."""

    clip: object | None = None
    vqa: object | None = None
    distances: object | None = None  # metric_fid.SetDistances with the reference already added
    reference_name: str | None = None
    batch_size: int = 32
    oracle_min_confidence: float = metric_oracle.MIN_CONFIDENCE


def _rows(suite: Suite, variant: Variant, out_dir: Path, n: int, seed: int) -> list[dict]:
    return [{"variant": variant.name, "index": r.index, "id": r.id, "category": r.category,
             "prompt": variant.prompts[r.index], "raw_prompt": r.prompt, "k": k,
             "seed": image_seed(seed, r.index, k, n),
             "image": str(image_path(out_dir, variant.name, r.index, k).relative_to(out_dir))}
            for r in suite.records if variant.prompts[r.index] for k in range(n)]


def _open(out_dir: Path, row: dict) -> Image.Image:
    with Image.open(out_dir / row["image"]) as img:
        return img.convert("RGB")


def _score_chunk(rows: list[dict], imgs: list[Image.Image], records: dict, scorers: Scorers) -> None:
    for row, img in zip(rows, imgs):
        constraints = records[row["index"]].constraints
        if constraints:
            row["oracle"] = metric_oracle.score_image(img, constraints, scorers.oracle_min_confidence)
    if scorers.clip is not None:
        for row, s in zip(rows, scorers.clip.score(imgs, [r["prompt"] for r in rows], scorers.batch_size)):
            row["clip"] = s
    if scorers.vqa is not None:
        vqa = scorers.vqa.score(imgs, [r["prompt"] for r in rows], [records[r["index"]].constraints for r in rows])
        for row, v in zip(rows, vqa):
            row.update(v)
    if scorers.distances is not None:
        scorers.distances.add(imgs, real=False)


def score_variant(suite: Suite, variant: Variant, out_dir: Path, images_per_prompt: int, seed: int,
                  scorers: Scorers) -> tuple[list[dict], dict]:
    rows = _rows(suite, variant, out_dir, images_per_prompt, seed)
    records = {r.index: r for r in suite.records}
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        _score_chunk(chunk, [_open(out_dir, row) for row in chunk], records, scorers)
    set_metrics: dict = {}
    if scorers.clip is not None:
        set_metrics["clip"] = scorers.clip.summary([p for p in variant.prompts if p])
    if scorers.distances is not None:
        for name, value in scorers.distances.compute().items():
            set_metrics[name] = value | {"reference": scorers.reference_name}
        scorers.distances.reset_generated()
    return rows, set_metrics
