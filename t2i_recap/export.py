"""`t2i-recap export --run DIR --out DIR`: a run's checkpoint as a diffusers pipeline folder.

The folder loads with plain diffusers, `DiffusionPipeline.from_pretrained(OUT)`, as a
PixArtAlphaPipeline (transformer, vae, text_encoder, tokenizer, scheduler), every part in float32,
and `pipe(prompt)` with diffusers' defaults generates at the trained size where diffusers allows it
(`plain_call`); OUT/t2i_recap.json holds the trained size and the generation defaults evaluation
reads (resolution, max_sequence_length, objective, num_inference_steps, guidance_scale; for a run
trained with data.aspect_buckets, its bucket sizes), and OUT/README.md is a model card with the
call, the config and the data provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path

import torch
import yaml

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.config import ConfigError
from t2i_recap.io import DiskFullError, RefusedOverwriteError, output_dir
from t2i_recap.logging_utils import get_logger, setup_logging

log = get_logger(__name__)
KIND = "export"
PROMPT = "a red circle in the top left corner"


def _sidecar_provenance(recaption_dir: str | None) -> dict:
    """Provenance the captioner stored in its parquet metadata (model id, prompt, settings), if any."""
    if not recaption_dir or not Path(recaption_dir).is_dir():
        return {}
    import pyarrow.parquet as pq

    files = sorted(Path(recaption_dir).glob("*.parquet"))
    if not files:
        return {}
    meta = pq.read_schema(files[0]).metadata or {}
    out = {k.decode(): v.decode(errors="replace")[:2000] for k, v in meta.items()
           if k not in (b"ARROW:schema", b"pandas")}
    return {"sidecars": len(files), "first_sidecar": files[0].name, "metadata": out}


# ---------------------------------------------------------------- what plain diffusers does


def pipeline_default(name: str):
    """The default of PixArtAlphaPipeline.__call__'s argument `name` in the installed diffusers."""
    from diffusers import PixArtAlphaPipeline

    return inspect.signature(PixArtAlphaPipeline.__call__).parameters[name].default


def _binning_tables() -> dict:
    # PixArtAlphaPipeline.__call__ picks its aspect-ratio buckets by transformer.config.sample_size
    # alone and raises "Invalid sample size" for any other (diffusers pipeline_pixart_alpha.py).
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha

    return {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}


def plain_call(sample_size: int, vae_scale: int) -> tuple[str, str | None]:
    """The shortest diffusers call that generates at the trained size, and why it needs an argument.

    With no height/width the pipeline generates at sample_size * vae_scale (the trained size). Its
    resolution binning (on by default) then moves that to a bucket of a table chosen by sample_size;
    the tables assume PixArt's 8x VAE, so the plain call is faithful only when the square bucket is
    the trained size itself (256, 512 or 1024 px with an 8x VAE). The bucket size is a function of
    sample_size and the VAE, both fixed by the trained weights: no honest export changes it.
    """
    size = sample_size * vae_scale
    table = _binning_tables().get(sample_size)
    if table is None:
        reason = (f"diffusers' resolution binning (on by default) knows only transformer sample sizes "
                  f"{', '.join(map(str, sorted(_binning_tables())))} (PixArt's latents of 256, 512, 1024 px under "
                  f"an 8x VAE) and raises 'Invalid sample size' for this model's {sample_size}x{sample_size} "
                  f"latent ({size} px under a {vae_scale}x VAE)")
    else:
        from diffusers.image_processor import PixArtImageProcessor

        binned = PixArtImageProcessor.classify_height_width_bin(size, size, ratios=table)
        if binned == (size, size):
            return "pipe(prompt)", None
        reason = (f"diffusers' resolution binning (on by default) would generate at {binned[0]}x{binned[1]} px, "
                  f"its bucket for sample size {sample_size} under an 8x VAE, and resize that to {size} px; "
                  f"this model was trained at {size} px under a {vae_scale}x VAE")
    return "pipe(prompt, use_resolution_binning=False)", reason


def extend_clip_positions(model, length: int):
    """Give a CLIPTextModel `length` position rows: the trained rows unchanged, the last one repeated.

    PixArtAlphaPipeline tokenizes to max_sequence_length (default 120) tokens and CLIP has 77
    positions, so without this the plain call fails. CLIP's text attention is causal and the pipeline
    passes the padding mask, so hidden states at positions below 77 do not depend on the new rows,
    and the DiT's cross-attention masks padding: prompts that fit the trained length are encoded
    exactly as in training. Longer prompts are not: training cut them at its length, the pipeline
    keeps up to `length` tokens, and the rows past 77 were never trained (they repeat row 76).
    """
    emb = getattr(model, "text_model", model).embeddings  # transformers < 5 wraps the tower in .text_model
    old = emb.position_embedding.weight.data
    if length <= old.shape[0]:
        return model
    table = torch.nn.Embedding(length, old.shape[1], device=old.device, dtype=old.dtype)
    table.weight.data.copy_(torch.cat([old, old[-1:].expand(length - old.shape[0], -1)]))
    emb.position_embedding = table
    emb.position_ids = torch.arange(length, device=old.device).expand((1, -1))
    model.config.max_position_embeddings = length
    return model


def trained_buckets(cfg, multiple: int) -> tuple[bool, list[list[int]] | None]:
    """(whether the run trained on aspect-ratio buckets, their (height, width) sizes in pixels): the
    table training drew from, `t2i_recap.buckets.bucket_table` at data.bucket_multiple or the latent
    patch `multiple`."""
    if not getattr(cfg.data, "aspect_buckets", False):
        return False, None
    from t2i_recap.buckets import bucket_table

    table = bucket_table(cfg.data.resolution, cfg.data.bucket_multiple or multiple)
    return True, [[int(h), int(w)] for h, w in table]


def _bucket_lines(settings: dict) -> list[str]:
    """The card's lines on generating at another size than the square one."""
    buckets = settings.get("buckets")
    if not settings.get("aspect_buckets"):
        return []
    h, w = max(buckets, key=lambda s: (s[1] / s[0], s[1]))  # the widest bucket as the example
    sizes = ", ".join(f"{bh}x{bw}" for bh, bw in buckets)
    return ["This model was trained on aspect-ratio buckets (data.aspect_buckets): each image at the "
            "(height x width) size nearest its shape. Generate at any of them with height and width "
            "(binning off: diffusers' own buckets are not these):", "",
            "```python", f"image = pipe({PROMPT!r}, height={h}, width={w}, use_resolution_binning=False).images[0]",
            "```", "", f"Trained sizes (height x width, px): {sizes}. With t2i-recap, pass `height=` and `width=` to "
            "`generate_from_settings` (below).", ""]


# ---------------------------------------------------------------- the folder


def _text_note(model_type: str, trained_len: int, positions: tuple[int, int] | None, chunks: int | None = None) -> str:
    default = pipeline_default("max_sequence_length")
    if chunks:
        body = trained_len // chunks - 2
        return (f"Training encoded captions in up to {chunks} chunks of {body} tokens, each with its own start and end "
                f"token (text_encoder.long_captions=chunks). Prompts of up to {body} tokens give the same features in "
                f"the plain call; longer ones are encoded there in one pass over position rows that were never "
                f"trained. For the training's encoding, use t2i_recap: `generate_from_settings` (below) encodes "
                f"in chunks, or pass prompt_embeds from `t2i_recap.long_text.encode_chunks`.")
    if positions:
        n, extended = positions
        return (f"CLIP has {n} positions and the pipeline's default max_sequence_length is {default}, so the "
                f"exported text encoder has {extended} position rows: the first {n} unchanged, the rest copies of "
                f"row {n - 1}. CLIP's attention is causal and padding is masked, so prompts of up to {trained_len} "
                f"tokens are encoded exactly as in training. Longer prompts are not: training cut captions at "
                f"{trained_len} tokens, the plain call keeps up to {default}, and tokens past {n} get untrained "
                f"position rows; pass max_sequence_length={trained_len} to cut as training did.")
    if trained_len == default:
        return f"The text encoder ({model_type}) was trained at {trained_len} tokens, the pipeline's default."
    return (f"The text encoder ({model_type}) was trained at {trained_len} tokens and the pipeline's default "
            f"max_sequence_length is {default}: prompts of up to {min(trained_len, default)} tokens are encoded as "
            f"in training (padding is masked); pass max_sequence_length={trained_len} to cut longer ones as "
            "training did.")


def usage(settings: dict) -> list[str]:
    """The model card's "Use" section: the plain diffusers call first, then the training settings."""
    res, call = settings["resolution"], settings["diffusers_call"].replace("prompt", repr(PROMPT), 1)
    lines = ["## Use", "", "Plain diffusers (t2i-recap need not be installed; no `trust_remote_code`):", "",
             "```python", "from diffusers import DiffusionPipeline", "",
             "pipe = DiffusionPipeline.from_pretrained('THIS_FOLDER')",
             f"image = {call}.images[0]  # {res}x{res}", "```", ""]
    if settings["diffusers_call_reason"]:
        lines += [f"`use_resolution_binning=False` is needed: {settings['diffusers_call_reason']}.", ""]
    lines += _bucket_lines(settings)
    chunks = settings.get("text_chunks")
    plain_len = settings["max_sequence_length"] // chunks if chunks else settings["max_sequence_length"]  # one chunk
    lines += [
        f"That call uses diffusers' defaults ({pipeline_default('num_inference_steps')} steps, guidance "
        f"{pipeline_default('guidance_scale')}). The settings this model was validated with (t2i_recap.json):", "",
        "```python",
        f"image = pipe({PROMPT!r}, num_inference_steps={settings['num_inference_steps']}, "
        f"guidance_scale={settings['guidance_scale']}, height={res}, width={res}, "
        f"max_sequence_length={plain_len}, use_resolution_binning=False, "
        "clean_caption=False).images[0]", "```", "",
        "or, with t2i-recap installed, `pipe, settings = t2i_recap.generation.load_pipeline('THIS_FOLDER')` and "
        f"`generate_from_settings(pipe, settings, [{PROMPT!r}], [0])`.", "",
        f"- {settings['text_note']}",
        "- The pipeline lowercases and strips every prompt, and with beautifulsoup4 and ftfy installed its "
        "default clean_caption=True rewrites it further; training encoded captions as written (the same where the "
        "tokenizer lowercases itself, as CLIP's does).",
        f"- Every part is stored in {settings['dtype']}; load with `torch_dtype=torch.bfloat16` to run in bf16.", "",
    ]
    return lines


def model_card(cfg, state: dict, settings: dict, weights: str, provenance: dict) -> str:
    from t2i_recap.config import to_dict

    counts = state.get("mix_counts", {})
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [t2i-recap, dit, pixart, recaption]",
        "---", "", f"# {cfg.model.name} text-to-image model (t2i-recap)", "",
        f"A {cfg.model.name} (diffusers PixArtTransformer2DModel) trained with t2i-recap's "
        f"{cfg.objective.name} objective at {cfg.data.resolution} px, conditioned on "
        f"`{cfg.text_encoder.name_or_path}` ({settings['max_sequence_length']} tokens) over the VAE "
        f"`{cfg.features.vae}`. Weights: {weights}, step {state.get('step')}, "
        f"{state.get('samples')} training samples seen.", "",
        *usage(settings),
        "## Captions", "",
        f"- share of ORIGINAL captions p = {cfg.mixing.p}; CFG dropout {cfg.mixing.cfg_dropout}",
        f"- original caption field `{cfg.data.original_caption}`, recaption field `{cfg.data.recaption}`",
        f"- drawn: {counts}",
        f"- truncated at the encoder's token limit: {state.get('truncated')}", "",
        "## Data provenance", "",
        f"- shards: `{cfg.data.shards or cfg.data.hf_dataset}`",
        f"- recaption sidecars: `{cfg.data.recaption_dir}`",
        "```json", json.dumps(provenance, indent=1), "```", "",
        "## Generation defaults (t2i_recap.json)", "", "```json", json.dumps(settings, indent=1), "```", "",
        "## Training config", "", "```yaml", yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False), "```",
    ]
    return "\n".join(lines) + "\n"


def build_pipeline(cfg, ck: dict, weights: str):
    """(PixArtAlphaPipeline in float32, the weights used, the text encoder, the CLIP position rows it was
    extended to or None)."""
    from diffusers import PixArtAlphaPipeline

    from t2i_recap import cache
    from t2i_recap.models import build_model
    from t2i_recap.objectives import build_objective

    encoder = cache.FeatureEncoder(cfg.features, cfg.text_encoder, "cpu")
    transformer = build_model(cfg.model, latent_channels=encoder.latent_channels,
                              latent_size=cfg.data.resolution // encoder.downsample,
                              caption_channels=encoder.text.hidden_size)
    transformer.load_state_dict(ck["model"])
    if weights == "ema" and ck["ema"] is not None:
        transformer.load_state_dict(ck["ema"], strict=False)  # EMA holds the parameters; buffers come from the model
    else:
        weights = "model"
    # One dtype for every part: plain diffusers loads each in its stored dtype and cannot run a bf16
    # text encoder beside a float32 transformer. Upcasting a bf16/fp16 encoder or VAE is exact.
    text_model, positions = encoder.text.model.float(), None
    default_len = pipeline_default("max_sequence_length")
    if encoder.text.model_type.startswith("clip") and text_model.config.max_position_embeddings < default_len:
        positions = (text_model.config.max_position_embeddings, default_len)
        extend_clip_positions(text_model, default_len)
    pipe = PixArtAlphaPipeline(tokenizer=encoder.text.tokenizer, text_encoder=text_model, vae=encoder.vae.float(),
                               transformer=transformer.float().eval(), scheduler=build_objective(cfg.objective).scheduler())
    return pipe, weights, encoder.text, positions


def export(run_dir: str | Path, out: str | Path, *, checkpoint: str = "latest", weights: str = "ema",
           overwrite: bool = False, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> Path:
    """Write the run's checkpoint as a pipeline folder at `out`.

    `overwrite` replaces only an earlier export (its marker file says so), never the run, a folder
    holding it or any other folder; the check runs before any work, and a failed export leaves `out`
    as it was and no temporary folder.
    """
    from t2i_recap.checkpoint import CheckpointConfig, Checkpointer
    from t2i_recap.config import load_config
    from t2i_recap.train_config import TrainConfig

    run_dir, out = Path(run_dir), Path(out)
    ck_path = Checkpointer(run_dir, CheckpointConfig()).resolve(checkpoint)
    with output_dir(out, kind=KIND, overwrite=overwrite, protect=(run_dir, ck_path)) as tmp:
        cfg = load_config(TrainConfig, run_dir / "config.yaml")
        ck = Checkpointer.load(ck_path)
        pipe, weights, text, positions = build_pipeline(cfg, ck, weights)
        call, reason = plain_call(pipe.transformer.config.sample_size, pipe.vae_scale_factor)
        bucketed, buckets = trained_buckets(cfg, pipe.vae_scale_factor * pipe.transformer.config.patch_size)
        settings = {
            "resolution": cfg.data.resolution, "max_sequence_length": text.max_length,
            "objective": cfg.objective.name,
            "num_inference_steps": num_inference_steps or cfg.validation.num_inference_steps,
            "guidance_scale": guidance_scale if guidance_scale is not None else cfg.validation.guidance_scale,
            "model": cfg.model.name, "step": ck["state"]["step"], "weights": weights, "caption_p": cfg.mixing.p,
            "text_encoder": cfg.text_encoder.name_or_path, "vae": cfg.features.vae, "dtype": "float32",
            "text_encoder_positions": positions and positions[1], "diffusers_call": call, "diffusers_call_reason": reason,
            "text_chunks": text.chunks,
            "text_note": _text_note(text.model_type, text.max_length, positions, text.chunks),
            "aspect_buckets": bucketed, "buckets": buckets,
        }
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "t2i_recap.json").write_text(json.dumps(settings, indent=2))
        card = model_card(cfg, ck["state"], settings, weights, _sidecar_provenance(cfg.data.recaption_dir))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    if reason:
        log.info("plain diffusers needs %s: %s", call, reason)
    log.info("exported %s (%s weights, step %d) to %s", run_dir, weights, ck["state"]["step"], out)
    return out


@dataclasses.dataclass
class ExportConfig:
    """What `t2i-recap export` writes (its flags, or --config / --set)."""

    run: str = ""
    """Run folder (trainer.run_dir)."""
    out: str = ""
    """Output pipeline folder."""
    checkpoint: str = "latest"
    """'latest' or a checkpoint folder."""
    weights: typing.Literal["ema", "model"] = "ema"
    """EMA weights (default, when kept) or the raw model weights."""
    num_inference_steps: int | None = None
    """Default sampler steps recorded for users (default: the run's validation steps)."""
    guidance_scale: float | None = None
    """Default CFG scale recorded for users (default: the run's validation scale)."""
    overwrite: bool = False
    """Replace an earlier export at --out (only a folder t2i-recap export wrote)."""


FLAGS = {"--run": "run", "--out": "out", "--checkpoint": "checkpoint", "--weights": "weights",
         "--num-inference-steps": "num_inference_steps", "--guidance-scale": "guidance_scale",
         "--overwrite": "overwrite"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap export", description="Export a run to a diffusers pipeline folder.")
    add_config_arguments(p, ExportConfig, FLAGS, required=("--run", "--out"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        args = config_from_args(ExportConfig, p.parse_args(argv))
    except ConfigError as exc:
        p.error(str(exc))
    setup_logging()
    try:
        out = export(args.run, args.out, checkpoint=args.checkpoint, weights=args.weights, overwrite=args.overwrite,
                     num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    except (DiskFullError, RefusedOverwriteError) as exc:
        print(f"t2i-recap export: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
