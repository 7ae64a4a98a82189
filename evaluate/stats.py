"""Aggregates with bootstrap confidence intervals over prompts.

Prompts, not images, are the unit resampled: the images of one prompt share its difficulty, so
resampling images would understate the uncertainty. The GenEval-style score (mean of category
means) is resampled within each category, so every replicate keeps the category mix.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 1000
ALPHA = 0.05


def _ci(samples: np.ndarray, alpha: float) -> list[float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def mean_ci(values: list[float], n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA) -> dict:
    """Mean of per-prompt values with a percentile bootstrap interval."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "ci": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return {"mean": float(x.mean()), "ci": _ci(boots, alpha), "n": int(x.size)}


def category_mean_ci(by_category: dict[str, list[float]], n_boot: int = N_BOOT, seed: int = 0,
                     alpha: float = ALPHA) -> dict:
    """Mean of category means (GenEval's overall score), bootstrapped within categories."""
    groups = {c: np.asarray([v for v in vs if v is not None], dtype=np.float64) for c, vs in by_category.items()}
    groups = {c: x for c, x in groups.items() if x.size}
    if not groups:
        return {"mean": None, "ci": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = np.mean([x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1) for x in groups.values()], axis=0)
    return {"mean": float(np.mean([x.mean() for x in groups.values()])), "ci": _ci(boots, alpha),
            "n": int(sum(x.size for x in groups.values()))}
