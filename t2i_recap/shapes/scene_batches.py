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
from t2i_recap.shapes.world import SHAPES, COLORS, Obj, Scene, sample_scene


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


def perturb_scene(scene: Scene, rng: random.Random) -> Scene:
    """A hard negative of `scene`: the same objects with one thing changed that a bag of words misses:
    objects moved to other cells, or (with two or more objects) two objects' colours or shapes
    swapped; a one-object scene may also change its colour or shape. Always differs from `scene`."""
    objs = list(scene.objects)
    for _ in range(100):
        kind = rng.choice(("move", "swap_color", "swap_shape") if len(objs) > 1 else ("move", "move", "color", "shape"))
        if kind == "move":
            cells = rng.sample([(r, c) for r in range(3) for c in range(3)], len(objs))
            new = [Obj(r, c, o.shape, o.color, o.size) for o, (r, c) in zip(objs, cells)]
        elif kind in ("swap_color", "swap_shape"):
            i, j = rng.sample(range(len(objs)), 2)
            a, b = objs[i], objs[j]
            new = list(objs)
            if kind == "swap_color":
                new[i], new[j] = Obj(a.row, a.col, a.shape, b.color, a.size), Obj(b.row, b.col, b.shape, a.color, b.size)
            else:
                new[i], new[j] = Obj(a.row, a.col, b.shape, a.color, a.size), Obj(b.row, b.col, a.shape, b.color, b.size)
        else:
            o = objs[0]
            if kind == "color":
                new = [Obj(o.row, o.col, o.shape, rng.choice([c for c in COLORS if c != o.color]), o.size)]
            else:
                new = [Obj(o.row, o.col, rng.choice([s for s in SHAPES if s != o.shape]), o.color, o.size)]
        variant = Scene(tuple(new))
        if variant != scene:
            return variant
    raise ValueError(f"could not perturb scene {scene}")  # unreachable for scenes of the shapes world
