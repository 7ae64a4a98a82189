"""Load the model under evaluation and generate (or reuse) its images for each prompt variant.

Seeds are fixed per (prompt index, image index): `seed + index * images_per_prompt + k`, the
same for the raw and recaptioned forms, so the two forms are paired. Images are written as
`images/<variant>/<index:05d>_<k:02d>.png` (names never come from prompt ids), atomically, and a
rerun generates only the images that are missing or were made from anything else (another model,
prompt, seed, step count, guidance, scheduler or image size: see `imageset`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from t2i_recap.io import atomic_path, atomic_write_text
from t2i_recap.logging_utils import get_logger

from .imageset import ImageSet

log = get_logger(__name__)
SIDECAR = "t2i_recap.json"


@dataclass
class GenSettings:
    images_per_prompt: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    resolution: int
    max_sequence_length: int
    batch_size: int
    text_chunks: int | None = None
    """Prompts encoded in this many chunks (a model trained with text_encoder.long_captions=chunks)."""
    height: int | None = None
    """Image height in pixels (None: `resolution`)."""
    width: int | None = None
    """Image width in pixels (None: `resolution`)."""

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the generated images."""
        return (self.height or self.resolution, self.width or self.resolution)


def image_seed(seed: int, index: int, k: int, images_per_prompt: int) -> int:
    return seed + index * images_per_prompt + k


def image_path(out_dir: Path, variant: str, index: int, k: int) -> Path:
    return out_dir / "images" / variant / f"{index:05d}_{k:02d}.png"


EXPORT_SOURCE = "export_source.json"


def _run_checkpoint_identity(run_dir: Path) -> dict:
    """The run's latest checkpoint and config, by content: what an export of it is made from."""
    from t2i_recap.checkpoint import CheckpointConfig, Checkpointer
    from t2i_recap.identity import file_digest, model_digest

    ck = Checkpointer(run_dir, CheckpointConfig()).resolve("latest")
    return {"checkpoint": ck.name, "checkpoint_digest": model_digest(ck),
            "config_sha256": file_digest(run_dir / "config.yaml")}


def resolve_model(model: str | Path, work_dir: Path) -> Path:
    """An exported pipeline folder as is; a training run folder is exported first into
    WORK/model (with `t2i-recap export`, the trainer's contract), and exported again when the
    run's latest checkpoint or config is no longer the one the folder was exported from."""
    model = Path(model)
    if (model / "model_index.json").is_file():
        return model
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder")
    if not (model / "config.yaml").is_file():
        raise FileNotFoundError(f"--model {model}: neither an exported pipeline (no model_index.json) nor a "
                                "training run (no config.yaml)")
    target = work_dir / "model"
    source = _run_checkpoint_identity(model)
    record = work_dir / EXPORT_SOURCE
    recorded = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    if (target / "model_index.json").is_file() and recorded == source:
        return target
    from t2i_recap.export import export

    log.info("%s is a training run; exporting its checkpoint %s to %s%s", model, source["checkpoint"], target,
             " (it changed since the last export)" if recorded else "")
    export(model, target, overwrite=True)
    atomic_write_text(record, json.dumps(source, indent=1))
    return target


def model_info(model_dir: Path) -> dict:
    """The export sidecar plus content hashes of the folder: `sha256` over every file (reports) and
    `digest` (`identity.model_digest`: the files that change outputs; keys reuse of images)."""
    sidecar = model_dir / SIDECAR
    from t2i_recap.identity import model_digest

    from .weights import folder_sha256

    info = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    return {"path": str(model_dir.resolve()), "sha256": folder_sha256(model_dir), "digest": model_digest(model_dir),
            "sidecar": info}


def _generate(pipe, prompts: list[str], seeds: list[int], s: GenSettings) -> list[Image.Image]:
    """The one call into the trainer's generation code (its contract in the helpers' notes)."""
    from t2i_recap.generation import generate_images

    return generate_images(pipe, prompts, seeds, num_inference_steps=s.num_inference_steps,
                           guidance_scale=s.guidance_scale, resolution=s.resolution,
                           max_sequence_length=s.max_sequence_length, batch_size=s.batch_size,
                           text_chunks=s.text_chunks, height=s.size[0], width=s.size[1])


def truncated_prompts(pipe, prompts: list[str | None], max_sequence_length: int, text_chunks: int | None = None) -> int:
    """How many prompts the model's own text encoder sees cut at `max_sequence_length` tokens
    (with `text_chunks`: at that many chunks of max_sequence_length / text_chunks - 2 caption tokens)."""
    texts = [p for p in prompts if p]
    if not texts or getattr(pipe, "tokenizer", None) is None:
        return 0
    ids = pipe.tokenizer(texts, truncation=False, verbose=False)["input_ids"]  # verbose: we count, not warn
    if text_chunks:
        body = text_chunks * (max_sequence_length // text_chunks - 2)
        return sum(len(row) - 2 > body for row in ids)  # each row holds one start and one end token
    return sum(len(row) > max_sequence_length for row in ids)


def _told_tokenizer(pipe) -> None:
    """The pipeline's own tokenizer call would warn once more ("Token indices sequence length is
    longer ..."): mark that once-per-tokenizer notice as given, the count above says it."""
    notices = getattr(getattr(pipe, "tokenizer", None), "deprecation_warnings", None)
    if isinstance(notices, dict):
        notices["sequence-length-is-longer-than-the-specified-maximum"] = True


@contextlib.contextmanager
def _quiet_diffusers():
    """The pipeline warns once per batch about truncated prompts; we count them instead."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _reusable(images: ImageSet, out_dir: Path, variant: str, i: int, k: int, prompt: str, s: GenSettings) -> bool:
    return (image_path(out_dir, variant, i, k).is_file()
            and images.matches(i, k, prompt, image_seed(s.seed, i, k, s.images_per_prompt)))


def generate_variant(pipe, out_dir: Path, variant: str, prompts: list[str | None], s: GenSettings,
                     key: dict, generate=_generate) -> dict:
    """Generate the images of one variant that are missing or were made from anything else than
    `key` (`imageset.set_key`), this prompt and this seed; returns counts for the report."""
    images = ImageSet(out_dir / "images" / variant, key)
    if images.stale:
        log.info("%s: the images in %s were made with another model or settings; generating them anew",
                 variant, images.path.parent)
    todo = [(i, k) for i, p in enumerate(prompts) if p for k in range(s.images_per_prompt)
            if not _reusable(images, out_dir, variant, i, k, p, s)]
    cut = truncated_prompts(pipe, prompts, s.max_sequence_length, s.text_chunks)
    if cut:
        log.warning("%s: %d of %d prompts are longer than the model's %d text tokens and are truncated",
                    variant, cut, sum(bool(p) for p in prompts), s.max_sequence_length)
        _told_tokenizer(pipe)
    info = {"generated": len(todo), "truncated_prompts": cut, "max_sequence_length": s.max_sequence_length}
    if not todo:
        if images.stale or not images.path.is_file():
            images.save()
        return info
    log.info("%s: generating %d images", variant, len(todo))
    with tqdm(total=len(todo), desc=f"generate {variant}", unit="img") as bar, _quiet_diffusers():
        for start in range(0, len(todo), s.batch_size):
            batch = todo[start:start + s.batch_size]
            seeds = [image_seed(s.seed, i, k, s.images_per_prompt) for i, k in batch]
            generated = generate(pipe, [prompts[i] for i, _ in batch], seeds, s)
            for (i, k), seed, img in zip(batch, seeds, generated, strict=True):
                with atomic_path(image_path(out_dir, variant, i, k), suffix=".png") as tmp:
                    img.save(tmp, format="PNG")
                images.record(i, k, prompts[i], seed)
            images.save()  # after the batch's images: an entry never names an image not yet written
            bar.update(len(batch))
    return info
