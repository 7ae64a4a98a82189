"""Generating images from a trained text-to-image pipeline: the one place that knows the call details.

Used by validation during training, by `export`'s self-check and by the evaluation package.
Each image has its own CPU generator seeded from `seeds`, so an image depends only on its prompt and
seed (not on the batch it landed in or the device), and reruns reproduce it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from PIL import Image

from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)
SETTINGS_FILE = "t2i_recap.json"


@dataclasses.dataclass
class ValidationConfig:
    every_steps: int = 0
    """Write a validation image grid every N steps (0 = only at the end; negative = never)."""
    prompts: list[str] = dataclasses.field(default_factory=lambda: [
        "a red circle in the top left corner", "A picture of a large blue square in the center.",
        "two green triangles", "a photo of a cat sitting on a sofa"])
    """Fixed prompts of the grid."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    """Seeds; the grid has one row per seed and one column per prompt."""
    num_inference_steps: int = 20
    """Sampler steps."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale."""
    batch_size: int = 8
    """Images per pipeline call."""
    loss_every_steps: int = -1
    """Held-out validation loss every N steps (0 = only at the end; negative = never), at fixed timesteps
    and noise so runs compare (t2i_recap/val_loss.py)."""
    loss_shards: str | None = None
    """Held-out shards for the validation loss (a pattern like data.shards, read with data's caption specs).
    None: the last `holdout_shards` of data.shards, kept out of training."""
    holdout_shards: int = 1
    """With loss_shards unset and loss_every_steps >= 0: how many of data.shards (the last ones) are held out."""
    loss_batches: int = 4
    """Held-out batches in the validation loss (the first ones, in shard order; the same every time)."""
    loss_batch_size: int = 8
    """Samples per held-out batch."""
    loss_timesteps: int = 8
    """Fixed timesteps per batch: the midpoints of the noise range cut in this many."""
    loss_seed: int = 0
    """Seed of the fixed noise."""
    height: int | None = None
    """Validation image height in pixels (None: data.resolution)."""
    width: int | None = None
    """Validation image width in pixels (None: data.resolution)."""

    def __post_init__(self) -> None:
        if not self.prompts or not self.seeds:
            raise ValueError("validation needs at least one prompt and one seed")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be >= 1")
        for name in ("holdout_shards", "loss_batches", "loss_batch_size", "loss_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ValueError(f"validation.{name} must be >= 8 pixels (or null for data.resolution), got {value}")


def validation_size(v: ValidationConfig, resolution: int) -> tuple[int, int]:
    """(height, width) of the validation images: validation.height/width, each defaulting to `resolution`."""
    return (v.height or resolution, v.width or resolution)


def generate_images(pipe, prompts: list[str], seeds: list[int], *, num_inference_steps: int, guidance_scale: float,
                    resolution: int, max_sequence_length: int, batch_size: int = 8,
                    text_chunks: int | None = None, height: int | None = None,
                    width: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order, `height` x `width` pixels (each None: `resolution`);
    `text_chunks` encodes prompts in chunks of max_sequence_length / text_chunks tokens, as a model
    trained with long_captions=chunks saw them."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds")
    height, width = height or resolution, width or resolution
    _check_size(pipe, height, width)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p, chunk_s = prompts[start:start + batch_size], seeds[start:start + batch_size]
        embeds = _prompt_embeds(pipe, chunk_p, guidance_scale > 1.0, max_sequence_length, text_chunks)
        try:
            out = pipe(
                **embeds,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk_s],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                max_sequence_length=max_sequence_length,
                use_resolution_binning=False,  # binning would resize to diffusers' own buckets, not the trained sizes
                clean_caption=False,           # keep prompts verbatim (and need neither bs4 nor ftfy)
                output_type="latent",
            )
        except IndexError as exc:
            if num_inference_steps != 1:
                raise
            # diffusers' PixArt pipeline reads 1 step as a distilled (DMD) sampler and indexes a second
            # scheduler output that most schedulers (DDPM, DPM-Solver, flow matching) do not return.
            raise ValueError(f"num_inference_steps=1 is not supported by {type(pipe.scheduler).__name__}; "
                             "use 2 or more") from exc
        images.extend(_decode(pipe, out.images))
    return images


def check_size(height: int, width: int, multiple: int, what: str = "generate_images") -> None:
    """Each side must be a positive multiple of the latent patch in pixels (`multiple`: VAE
    downsampling x DiT patch size; the pipeline would otherwise floor the latent and the transformer
    fail on a ragged patch grid) and of 8 (PixArtAlphaPipeline.check_inputs refuses anything else).
    The trainer calls it before its first step."""
    step = math.lcm(multiple, 8)
    for name, value in (("height", height), ("width", width)):
        if value < 1 or value % step:
            raise ValueError(f"{what}: {name}={value} px is not a positive multiple of {step} px (the latent patch, "
                             f"VAE downsampling x DiT patch size = {multiple} px, and PixArtAlphaPipeline's 8 px)")


def latent_patch(pipe) -> int:
    """The latent patch of a pipeline in pixels: VAE downsampling x DiT patch size."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    return getattr(pipe, "vae_scale_factor", 8) * (getattr(config, "patch_size", None) or 1)


def _check_size(pipe, height: int, width: int) -> None:
    check_size(height, width, latent_patch(pipe))


def _prompt_embeds(pipe, prompts: list[str], guidance: bool, max_sequence_length: int,
                   text_chunks: int | None = None) -> dict:
    """Prompt embeddings in the transformer's dtype (in chunks with `text_chunks`, t2i_recap/long_text.py).

    PixArtAlphaPipeline keeps the text encoder's dtype for the embeddings and the initial latents, so
    a bf16 text encoder beside an fp32 transformer fails in its first Linear; diffusers' SD3 and Flux
    pipelines cast the embeddings to the transformer's dtype, as done here.
    """
    dtype = pipe.transformer.dtype
    if text_chunks:
        return _chunked_embeds(pipe, prompts, guidance, max_sequence_length // text_chunks, text_chunks, dtype)
    pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=guidance, device=pipe._execution_device,
                                        clean_caption=False, max_sequence_length=max_sequence_length)
    out = {"prompt": None, "negative_prompt": None, "prompt_embeds": pe.to(dtype), "prompt_attention_mask": pm}
    if guidance:
        out.update(negative_prompt_embeds=ne.to(dtype), negative_prompt_attention_mask=nm)
    return out


def _chunked_embeds(pipe, prompts: list[str], guidance: bool, chunk_len: int, chunks: int, dtype) -> dict:
    from t2i_recap.long_text import encode_chunks

    pe, pm, _ = encode_chunks(pipe.tokenizer, pipe.text_encoder, prompts, chunks, chunk_len)
    out = {"prompt": None, "negative_prompt": None, "prompt_embeds": pe.to(dtype), "prompt_attention_mask": pm}
    if guidance:  # the empty negative prompt, as the trainer's CFG dropout encodes it
        ne, nm, _ = encode_chunks(pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), chunks, chunk_len)
        out.update(negative_prompt_embeds=ne.to(dtype), negative_prompt_attention_mask=nm)
    return out


@torch.no_grad()
def _decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents to PIL images through the VAE in its own dtype.

    PixArtAlphaPipeline decodes latents in the transformer's dtype; a bf16 VAE beside an fp32
    transformer then fails ("Input type (float) and bias type (c10::BFloat16)"). diffusers' SDXL and
    Flux pipelines cast to vae.dtype before decoding, as done here.
    """
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def load_pipeline(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load an exported folder; returns (pipeline, settings from t2i_recap.json)."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    settings_file = path / SETTINGS_FILE
    if not settings_file.is_file():
        raise FileNotFoundError(f"{path} is not a t2i-recap export (no {SETTINGS_FILE})")
    settings = json.loads(settings_file.read_text())
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = DiffusionPipeline.from_pretrained(str(path), **kw)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, settings


def generate_from_settings(pipe, settings: dict, prompts: list[str], seeds: list[int], **overrides) -> list[Image.Image]:
    """generate_images with the defaults an export recorded in t2i_recap.json (its height and width,
    when it records them; `height=`/`width=` overrides pick another size, e.g. one of its buckets)."""
    kw = {k: settings[k] for k in ("num_inference_steps", "guidance_scale", "resolution", "max_sequence_length")}
    kw["text_chunks"] = settings.get("text_chunks")
    kw.update({k: settings[k] for k in ("height", "width") if settings.get(k)})
    kw.update(overrides)
    return generate_images(pipe, prompts, seeds, **kw)


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images laid out row by row, `cols` per row (diffusers' make_image_grid); a short last row is padded white."""
    from diffusers.utils import make_image_grid

    if not images:
        raise ValueError("image_grid needs at least one image")
    if cols < 1:
        raise ValueError(f"image_grid: cols must be >= 1, got {cols}")
    rows = (len(images) + cols - 1) // cols
    blank = Image.new("RGB", images[0].size, (255, 255, 255))
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
