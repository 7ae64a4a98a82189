"""Set-level image distances between generated and reference images.

* FID through torchmetrics' `FrechetInceptionDistance`, with a local Inception weights file (the
  standard `weights-inception-2015-12-05-6726825d.pth`, or the same tensors as .safetensors) and
  `antialias` passed explicitly: torchmetrics >= 1.8 defaults to True, which differs from the
  reference implementation, so the default here is False (paper-comparable; docs/references.md section 5).
  The network is `evaluate/inception.py`, torch-fidelity's Inception-v3 layer for layer (checked
  bit-identical on random weights), given to torchmetrics as its `feature` module: torch-fidelity
  itself imports torchvision, whose wheels fail beside a CPU-only torch.
* FD-CLIP: the same Frechet distance over CLIP image embeddings (torchmetrics' FID with the CLIP
  image tower as its `feature` module), and CMMD (Jayasumana et al. 2024: MMD with a Gaussian
  kernel, sigma 10, scaled by 1000, over L2-normalised CLIP embeddings). Neither needs Inception.

Reference images: a folder of images (searched recursively), webdataset shards (a folder, glob
or brace pattern of .tar files), or `gold` (the suite's gold scenes rendered).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image

from t2i_recap.logging_utils import get_logger

from .metric_clip import ClipScorer, to_uint8_tensor
from .weights import require_file

log = get_logger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _open_rgb(data: bytes | Path) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return img.convert("RGB")


def iter_reference(spec: str | Path, limit: int | None = None) -> Iterator[Image.Image]:
    """Reference images from a folder or webdataset shards, streamed; unreadable images are
    skipped and logged with their name (a few bad files must not void a 30K-image reference)."""
    from t2i_recap.io import expand_shards
    from t2i_recap.shards import iter_tar_samples

    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        sources = ((str(p), p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        sources = ((f"{s.shard}:{s.key}", next((s.files[e] for e in ("jpg", "png", "jpeg", "webp")
                                                 if e in s.files), None))
                   for shard in expand_shards(spec) for s in iter_tar_samples(shard))
    n = 0
    for name, data in sources:
        if limit is not None and n >= limit:
            return
        if data is None:
            continue
        try:
            img = _open_rgb(data)
        except OSError as exc:
            log.warning("reference image %s skipped: %s", name, exc)
            continue
        n += 1
        yield img
    if n == 0:
        raise FileNotFoundError(f"reference {spec}: no readable images")


def load_reference(spec: str | Path, limit: int | None = None) -> list[Image.Image]:
    return list(iter_reference(spec, limit))


def chunks(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _update(metric, images: list[Image.Image], real: bool, batch_size: int) -> None:
    """Feed uint8 tensors, batched by image size (a batch must stack)."""
    by_size: dict[tuple[int, int], list[Image.Image]] = {}
    for img in images:
        by_size.setdefault(img.size, []).append(img)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            batch = torch.stack([to_uint8_tensor(i) for i in group[start:start + batch_size]])
            metric.update(batch.to(metric.device), real=real)


class _ClipImageFeature(torch.nn.Module):
    """CLIP's image tower as a torchmetrics `feature` module; remembers what it embedded so CMMD
    reuses the same embeddings."""

    def __init__(self, scorer: ClipScorer):
        super().__init__()
        self.scorer = scorer
        self.num_features = int(scorer.model.config.projection_dim)
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        px = self.scorer.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        feats = self.scorer.model.get_image_features(px.to(images.device)).float()
        self.seen.append(feats.detach().cpu())
        return feats


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD between embedding sets x (N, D) and y (M, D), as the reference implementation
    (google-research/cmmd): biased MMD^2 with a Gaussian RBF kernel on unit-norm embeddings."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    gamma = 1.0 / (2 * sigma**2)

    def k(a, b, block: int = 4096):  # mean kernel value, in blocks: 30K x 30K at once is 7 GB
        total = 0.0
        for start in range(0, a.shape[0], block):
            rows = a[start:start + block]
            d2 = (rows * rows).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * rows @ b.T
            total += float(torch.exp(-gamma * d2).sum())
        return total / (a.shape[0] * b.shape[0])

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


def _inception_metric(weights: str | Path | None, antialias: bool):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .inception import load_fid_inception

    weights = require_file(weights, "--inception-weights", "FID")
    # torchmetrics computes the statistics; the network is evaluate/inception.py's copy of
    # torch-fidelity's, since torch-fidelity's import of torchvision fails beside a CPU-only torch.
    return FrechetInceptionDistance(feature=load_fid_inception(weights, antialias=antialias), normalize=False,
                                    reset_real_features=False)


class SetDistances:
    """Streaming FID / FD-CLIP / CMMD: reference images are embedded once, then each set of
    generated images is added in chunks, computed, and cleared (`reset_generated`)."""

    def __init__(self, clip: ClipScorer | None = None, inception_weights: str | Path | None = None,
                 antialias: bool = False, batch_size: int = 64):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch_size, self.antialias = batch_size, antialias
        self.inception_weights = None if inception_weights is None else str(inception_weights)
        self.metrics: dict = {}
        self.feature = None
        if inception_weights is not None:
            self.metrics["fid"] = _inception_metric(inception_weights, antialias)
        if clip is not None:
            self.feature = _ClipImageFeature(clip)
            self.metrics["fd_clip"] = FrechetInceptionDistance(feature=self.feature, normalize=False,
                                                               reset_real_features=False)
        if not self.metrics:
            raise ValueError("set distances need a CLIP model (--clip) or Inception weights (--inception-weights)")
        if torch.cuda.is_available():
            self.metrics = {k: m.cuda() for k, m in self.metrics.items()}
        self.feats: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        self.count = {True: 0, False: 0}

    @torch.no_grad()
    def add(self, images: list[Image.Image], real: bool) -> None:
        for name, metric in self.metrics.items():
            if name == "fd_clip":
                self.feature.seen = []
            _update(metric, images, real, self.batch_size)
            if name == "fd_clip":
                self.feats[real].extend(self.feature.seen)
        self.count[real] += len(images)

    def compute(self) -> dict:
        n_gen, n_ref = self.count[False], self.count[True]
        if n_gen < 2 or n_ref < 2:
            raise ValueError(f"image distances need >= 2 images per side, got {n_gen} generated and {n_ref} reference")
        out: dict = {}
        sizes = {"num_generated": n_gen, "num_reference": n_ref}
        if "fd_clip" in self.metrics:
            out["clip_distance"] = {"fd_clip": float(self.metrics["fd_clip"].compute()),
                                    "cmmd": cmmd(torch.cat(self.feats[False]), torch.cat(self.feats[True])), **sizes}
        if "fid" in self.metrics:
            out["fid"] = {"fid": float(self.metrics["fid"].compute()), "antialias": self.antialias,
                          "weights": self.inception_weights, **sizes}
        return out

    def reset_generated(self) -> None:
        for metric in self.metrics.values():
            metric.reset()  # reset_real_features=False: the reference statistics stay
        self.feats[False], self.count[False] = [], 0


def clip_distances(generated: list[Image.Image], reference: list[Image.Image], scorer: ClipScorer,
                   batch_size: int = 64) -> dict:
    """FD on CLIP image embeddings (via torchmetrics) and CMMD, with the CLIP of `scorer`."""
    d = SetDistances(clip=scorer, batch_size=batch_size)
    d.add(reference, real=True)
    d.add(generated, real=False)
    return d.compute()["clip_distance"]


def inception_fid(generated: list[Image.Image], reference: list[Image.Image], weights: str | Path | None,
                  antialias: bool = False, batch_size: int = 64) -> float:
    weights = require_file(weights, "--inception-weights", "FID")
    d = SetDistances(inception_weights=weights, antialias=antialias, batch_size=batch_size)
    d.add(reference, real=True)
    d.add(generated, real=False)
    return d.compute()["fid"]["fid"]
