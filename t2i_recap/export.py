"""`t2i-recap export --run DIR --out DIR`: a run's checkpoint as a diffusers pipeline folder.

The folder loads with `DiffusionPipeline.from_pretrained(OUT)` as a PixArtAlphaPipeline
(transformer, vae, text_encoder, tokenizer, scheduler); OUT/t2i_recap.json holds the generation
defaults evaluation reads (resolution, max_sequence_length, objective, num_inference_steps,
guidance_scale), and OUT/README.md is a model card with the config and the data provenance.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from t2i_recap.logging_utils import get_logger, setup_logging

log = get_logger(__name__)


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
        "## Use", "", "```python", "from diffusers import DiffusionPipeline",
        "from t2i_recap.generation import load_pipeline, generate_from_settings",
        "pipe, settings = load_pipeline('THIS_FOLDER')",
        "images = generate_from_settings(pipe, settings, ['a red circle in the top left corner'], [0])", "```", "",
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


def export(run_dir: str | Path, out: str | Path, *, checkpoint: str = "latest", weights: str = "ema",
           overwrite: bool = False, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> Path:
    from diffusers import PixArtAlphaPipeline

    from t2i_recap import cache
    from t2i_recap.checkpoint import CheckpointConfig, Checkpointer
    from t2i_recap.config import load_config
    from t2i_recap.models import build_model
    from t2i_recap.objectives import build_objective
    from t2i_recap.train_config import TrainConfig

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    ck = Checkpointer.load(Checkpointer(run_dir, CheckpointConfig()).resolve(checkpoint))
    encoder = cache.FeatureEncoder(cfg.features, cfg.text_encoder, "cpu")
    transformer = build_model(cfg.model, latent_channels=encoder.latent_channels,
                              latent_size=cfg.data.resolution // encoder.downsample,
                              caption_channels=encoder.text.hidden_size)
    transformer.load_state_dict(ck["model"])
    if weights == "ema" and ck["ema"] is not None:
        transformer.load_state_dict(ck["ema"], strict=False)  # EMA holds the parameters; buffers come from the model
    else:
        weights = "model"
    objective = build_objective(cfg.objective)
    pipe = PixArtAlphaPipeline(tokenizer=encoder.text.tokenizer, text_encoder=encoder.text.model, vae=encoder.vae,
                               transformer=transformer.eval(), scheduler=objective.scheduler())
    settings = {
        "resolution": cfg.data.resolution, "max_sequence_length": encoder.text.max_length,
        "objective": cfg.objective.name,
        "num_inference_steps": num_inference_steps or cfg.validation.num_inference_steps,
        "guidance_scale": guidance_scale if guidance_scale is not None else cfg.validation.guidance_scale,
        "model": cfg.model.name, "step": ck["state"]["step"], "weights": weights, "caption_p": cfg.mixing.p,
        "text_encoder": cfg.text_encoder.name_or_path, "vae": cfg.features.vae,
    }
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "t2i_recap.json").write_text(json.dumps(settings, indent=2))
    card = model_card(cfg, ck["state"], settings, weights, _sidecar_provenance(cfg.data.recaption_dir))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported %s (%s weights, step %d) to %s", run_dir, weights, ck["state"]["step"], out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i-recap export", description="Export a run to a diffusers pipeline folder.")
    p.add_argument("--run", required=True, help="run folder (trainer.run_dir)")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA weights (default, when kept) or raw")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default sampler steps recorded for users")
    p.add_argument("--guidance-scale", type=float, default=None, help="default CFG scale recorded for users")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    setup_logging()
    out = export(args.run, args.out, checkpoint=args.checkpoint, weights=args.weights, overwrite=args.overwrite,
                 num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
