"""Batches of rendered shapes-world scenes for training the tiny CLIP and VAE.

Scenes come from one seeded `random.Random` stream, so a batch sequence is reproducible from
its seed alone (no global RNG, no worker processes). A held-out set of scenes can be excluded
so that evaluation scenes are never seen in training.
"""

from __future__ import annotations

import random
from typing import Iterable

import numpy as np
import torch

from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption
from t2i_recap.shapes.render import render
from t2i_recap.shapes.world import Scene, sample_scene


def sample_scenes(rng: random.Random, n: int, exclude: Iterable[Scene] = ()) -> list[Scene]:
    """`n` random scenes, none equal to a scene in `exclude`."""
    banned = set(exclude)
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng)
        if scene not in banned:
            out.append(scene)
    return out


def render_uint8(scenes: list[Scene], resolution: int) -> np.ndarray:
    """Rendered scenes as a (N, H, W, 3) uint8 array."""
    return np.stack([np.asarray(render(s, resolution), dtype=np.uint8) for s in scenes])


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def gold_captions(scenes: list[Scene], rng: random.Random) -> list[str]:
    """One gold caption per scene, the template cycling so every phrasing appears in each batch."""
    start = rng.randrange(len(GOLD_TEMPLATES))
    return [gold_caption(s, rng, GOLD_TEMPLATES[(start + i) % len(GOLD_TEMPLATES)]) for i, s in enumerate(scenes)]
