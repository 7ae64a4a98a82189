"""Score one prompt variant's images with every configured metric.

Per-image metrics (oracle, CLIP score, VQA) become rows; set-level metrics (FID, FD-CLIP, CMMD)
are computed once per variant against the reference images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from t2i_recap.logging_utils import get_logger

from . import metric_oracle
from .generate import image_path, image_seed, load_images
from .protocol import Variant
from .suites import Suite

log = get_logger(__name__)


@dataclass
class Scorers:
    """The metric models, loaded once for all variants (None = metric not requested)."""

    clip: object | None = None
    vqa: object | None = None
    reference: list[Image.Image] | None = None
    reference_name: str | None = None
    inception_weights: str | None = None
    fid_antialias: bool = False
    batch_size: int = 32
    oracle_min_confidence: float = metric_oracle.MIN_CONFIDENCE


def _rows(suite: Suite, variant: Variant, out_dir: Path, n: int, seed: int) -> list[dict]:
    return [{"variant": variant.name, "index": r.index, "id": r.id, "category": r.category,
             "prompt": variant.prompts[r.index], "raw_prompt": r.prompt, "k": k,
             "seed": image_seed(seed, r.index, k, n),
             "image": str(image_path(out_dir, variant.name, r.index, k).relative_to(out_dir))}
            for r in suite.records if variant.prompts[r.index] for k in range(n)]


def score_variant(suite: Suite, variant: Variant, out_dir: Path, images_per_prompt: int, seed: int,
                  scorers: Scorers) -> tuple[list[dict], dict]:
    rows = _rows(suite, variant, out_dir, images_per_prompt, seed)
    images = load_images(out_dir, variant.name, variant.prompts, images_per_prompt)
    imgs = [images[(row["index"], row["k"])] for row in rows]
    records = {r.index: r for r in suite.records}
    for row, img in zip(rows, imgs):
        constraints = records[row["index"]].constraints
        if constraints:
            row["oracle"] = metric_oracle.score_image(img, constraints, scorers.oracle_min_confidence)
    set_metrics: dict = {}
    if scorers.clip is not None:
        for row, s in zip(rows, scorers.clip.score(imgs, [r["prompt"] for r in rows], scorers.batch_size)):
            row["clip"] = s
        prompts = [p for p in variant.prompts if p]
        set_metrics["clip"] = scorers.clip.summary(prompts)
    if scorers.vqa is not None:
        vqa = scorers.vqa.score(imgs, [r["prompt"] for r in rows],
                                [records[r["index"]].constraints for r in rows])
        for row, v in zip(rows, vqa):
            row.update(v)
    set_metrics.update(_set_metrics(imgs, scorers))
    return rows, set_metrics


def _set_metrics(imgs: list[Image.Image], scorers: Scorers) -> dict:
    out: dict = {}
    if scorers.reference is None:
        return out
    from . import metric_fid

    if scorers.clip is not None:
        out["clip_distance"] = metric_fid.clip_distances(imgs, scorers.reference, scorers.clip, scorers.batch_size)
        out["clip_distance"]["reference"] = scorers.reference_name
    if scorers.inception_weights is not None:
        out["fid"] = {"fid": metric_fid.inception_fid(imgs, scorers.reference, scorers.inception_weights,
                                                      scorers.fid_antialias, scorers.batch_size),
                      "antialias": scorers.fid_antialias, "weights": scorers.inception_weights,
                      "reference": scorers.reference_name, "num_generated": len(imgs),
                      "num_reference": len(scorers.reference)}
    return out
