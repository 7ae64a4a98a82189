"""Set-level image distances between generated and reference images.

* FID through torchmetrics' `FrechetInceptionDistance`, with a local Inception weights file
  (`feature_extractor_weights_path`; the standard `pt_inception-2015-12-05` file) and
  `antialias` passed explicitly: torchmetrics >= 1.8 defaults to True, which differs from the
  reference implementation, so the default here is False (paper-comparable; REFERENCE.md s5).
  The Inception network comes from the `torch-fidelity` package (which needs torchvision).
* FD-CLIP: the same Frechet distance over CLIP image embeddings (torchmetrics' FID with the CLIP
  image tower as its `feature` module), and CMMD (Jayasumana et al. 2024: MMD with a Gaussian
  kernel, sigma 10, scaled by 1000, over L2-normalised CLIP embeddings). Neither needs Inception.

Reference images: a folder of images (searched recursively), webdataset shards (a folder, glob
or brace pattern of .tar files), or `gold` (the suite's gold scenes rendered).
"""

from __future__ import annotations

import io
from pathlib import Path

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


def load_reference(spec: str | Path, limit: int | None = None) -> list[Image.Image]:
    """Reference images from a folder or webdataset shards; unreadable images are skipped and
    logged with their name (a few bad files must not void a 30K-image reference)."""
    from t2i_recap.io import expand_shards
    from t2i_recap.shards import iter_tar_samples

    path = Path(spec)
    out: list[Image.Image] = []
    if path.is_dir() and not any(path.glob("*.tar")):
        sources = [(str(p), p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        sources = ((f"{s.shard}:{s.key}", next((s.files[e] for e in ("jpg", "png", "jpeg", "webp")
                                                 if e in s.files), None))
                   for shard in expand_shards(spec) for s in iter_tar_samples(shard))
    for name, data in sources:
        if limit is not None and len(out) >= limit:
            break
        if data is None:
            continue
        try:
            out.append(_open_rgb(data))
        except OSError as exc:
            log.warning("reference image %s skipped: %s", name, exc)
    if not out:
        raise FileNotFoundError(f"reference {spec}: no readable images")
    return out


def _update(metric, images: list[Image.Image], real: bool, batch_size: int) -> None:
    """Feed uint8 tensors, batched by image size (a batch must stack)."""
    by_size: dict[tuple[int, int], list[Image.Image]] = {}
    for img in images:
        by_size.setdefault(img.size, []).append(img)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            batch = torch.stack([to_uint8_tensor(i) for i in group[start:start + batch_size]])
            metric.update(batch.to(metric.device), real=real)


def inception_fid(generated: list[Image.Image], reference: list[Image.Image], weights: str | Path | None,
                  antialias: bool = False, batch_size: int = 64) -> float:
    weights = require_file(weights, "--inception-weights", "FID")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception lives there)
    except ImportError as exc:
        raise ImportError(f"FID needs the torch-fidelity package (and torchvision): pip install torch-fidelity "
                          f"torchvision ({exc})") from None
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights),
                                      antialias=antialias, normalize=False)
    if torch.cuda.is_available():
        metric = metric.cuda()
    _update(metric, reference, True, batch_size)
    _update(metric, generated, False, batch_size)
    return float(metric.compute())


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

    def k(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return torch.exp(-gamma * d2).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


@torch.no_grad()
def clip_distances(generated: list[Image.Image], reference: list[Image.Image], scorer: ClipScorer,
                   batch_size: int = 64) -> dict:
    """FD on CLIP image embeddings (via torchmetrics) and CMMD, with the CLIP of `scorer`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(generated) < 2 or len(reference) < 2:
        raise ValueError(f"CLIP-feature distances need >= 2 images per side, got {len(generated)} "
                         f"generated and {len(reference)} reference")
    feature = _ClipImageFeature(scorer)
    metric = FrechetInceptionDistance(feature=feature, normalize=False, reset_real_features=True)
    _update(metric, reference, True, batch_size)
    ref_feats = torch.cat(feature.seen)
    feature.seen = []
    _update(metric, generated, False, batch_size)
    gen_feats = torch.cat(feature.seen)
    return {"fd_clip": float(metric.compute()), "cmmd": cmmd(gen_feats, ref_feats),
            "num_generated": len(generated), "num_reference": len(reference)}
