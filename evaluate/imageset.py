"""What each generated image was made from, so a rerun into the same --out reuses an image only
when it would come out the same.

`images/<variant>/imageset.json` records the set's key (model digest by content, steps, guidance,
scheduler, resolution, image height and width when they are not the square resolution, text
length, images per prompt) and, per image, its prompt's hash and its
seed. A set whose key differs (another model, step count, ...) is generated anew; within a set,
an image is reused only when its prompt and seed match. Images found without an entry (a crash
between writing the image and its entry, or a folder from before this record) are regenerated.
The record is rewritten atomically after every batch, so a killed run keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from t2i_recap.io import atomic_write_text

MANIFEST = "imageset.json"
VERSION = 1


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def scheduler_identity(pipe) -> dict | None:
    """The sampler as it will run: its class and full config (after any --scheduler swap)."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return None
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str))}


def set_key(model_digest: str, settings, scheduler: dict | None) -> dict:
    """Everything shared by a set's images that decides what they look like.

    The image size enters as `height`/`width` only when it is not resolution x resolution, so a set
    recorded before sizes could be chosen keeps its key (its images are that square)."""
    key = {"version": VERSION, "model_digest": model_digest, "num_inference_steps": settings.num_inference_steps,
           "guidance_scale": settings.guidance_scale, "resolution": settings.resolution,
           "max_sequence_length": settings.max_sequence_length, "images_per_prompt": settings.images_per_prompt,
           "scheduler": scheduler}
    height, width = getattr(settings, "size", (settings.resolution, settings.resolution))
    if (height, width) != (settings.resolution, settings.resolution):
        key.update(height=height, width=width)
    return key


class ImageSet:
    """The record of one variant's image folder."""

    def __init__(self, folder: Path, key: dict):
        self.path = Path(folder) / MANIFEST
        self.key = key
        self.images: dict[str, dict] = {}
        self.stale = False
        if self.path.is_file():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if old.get("key") == key:
                self.images = old.get("images", {})
            else:
                self.stale = True

    @staticmethod
    def name(index: int, k: int) -> str:
        return f"{index:05d}_{k:02d}"

    def matches(self, index: int, k: int, prompt: str, seed: int) -> bool:
        entry = self.images.get(self.name(index, k))
        return entry == {"prompt_sha256": prompt_hash(prompt), "seed": seed}

    def record(self, index: int, k: int, prompt: str, seed: int) -> None:
        self.images[self.name(index, k)] = {"prompt_sha256": prompt_hash(prompt), "seed": seed}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "images": self.images}, indent=1, sort_keys=True))
