"""`t2i-recap eval run`: generate a prompt suite's images with a model, score them, write the report.

    t2i-recap eval run --model EXPORT_OR_RUN --suite shapes|PROMPTS_FILE --out DIR \
        [--images-per-prompt N] [--steps S] [--guidance G] [--seed S] [--batch-size B] [--height H --width W] \
        [--clip CLIP_DIR] [--vqa-model VLM_DIR] [--reference IMAGES|SHARDS|gold] \
        [--inception-weights FILE] [--recaption auto|none|column|gold|CAPTIONER_DIR] \
        [--config configs/eval/X.yaml] [--set key=value ...]

A rerun with the same OUT reuses finished images and recaptions and rescores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.config import ConfigError, save_config
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging

log = get_logger(__name__)


@dataclasses.dataclass
class EvalConfig:
    model: str = ""
    """Exported pipeline folder (`t2i-recap export`), or a training run folder (exported first)."""
    suite: str = "shapes"
    """`shapes` (built-in compositional suite) or a prompt file (txt, jsonl, json, csv, parquet)."""
    out: str = ""
    """Output folder: images, scores, report.json/.md/.html."""
    per_category: int = 12
    """Shapes suite: prompts per category."""
    suite_seed: int = 0
    """Shapes suite: which prompts are drawn."""
    images_per_prompt: int = 4
    """Images per prompt (GenEval uses 4)."""
    seed: int = 0
    """Base seed; image k of prompt i uses seed + i * images_per_prompt + k."""
    steps: int | None = None
    """Sampler steps (default: the export's num_inference_steps)."""
    guidance: float | None = None
    """Classifier-free guidance scale (default: the export's guidance_scale)."""
    scheduler: str | None = None
    """A diffusers scheduler class name to sample with instead of the exported one."""
    resolution: int | None = None
    """Image side in pixels (default: the export's resolution)."""
    height: int | None = None
    """Generated image height in pixels (default: the resolution); the shapes oracle needs height == width."""
    width: int | None = None
    """Generated image width in pixels (default: the resolution); the shapes oracle needs height == width."""
    max_sequence_length: int | None = None
    """Text tokens (default: the export's max_sequence_length)."""
    batch_size: int = 16
    """Images per generation call and per metric batch."""
    device: str | None = None
    """cuda or cpu (default: cuda when available)."""
    dtype: str = "float32"
    """Pipeline dtype: float32, float16 or bfloat16."""
    recaption: str = "auto"
    """Recaptioned prompt form: auto, none, column, gold, or a captioner model folder."""
    recaption_max_new_tokens: int = 128
    """Captioner token cap (the paper: 128)."""
    images_root: str | None = None
    """Folder the suite's `image` column is relative to (default: the suite file's folder)."""
    clip: str | None = None
    """Local CLIP folder for CLIP score and FD-CLIP/CMMD (off when unset)."""
    vqa_model: str | None = None
    """Local vision-language model folder for VQA score (off when unset)."""
    reference: str = "auto"
    """Reference images for distances: a folder, shards, `gold`, `none`, or auto (gold if the suite has scenes)."""
    max_reference: int | None = None
    """Use at most this many reference images."""
    inception_weights: str | None = None
    """Local Inception weights file for FID (pt_inception-2015-12-05-6726825d.pth); FID off when unset."""
    fid_antialias: bool = False
    """torchmetrics FID `antialias` (False matches the reference implementation)."""
    oracle_min_confidence: float = 0.15
    """The oracle counts an object only when read with at least this confidence (1.0 on clean renders)."""
    worst_failures: int = 12
    """How many worst prompts the report shows."""

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1 or self.batch_size < 1 or self.per_category < 1:
            raise ValueError("images_per_prompt, batch_size and per_category must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("resolution", "height", "width"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ValueError(f"{name} must be >= 8 pixels (or unset for the export's resolution), got {value}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")


def _settings(cfg: EvalConfig, sidecar: dict):
    from .generate import GenSettings

    def pick(value, key, fallback=None):
        if value is not None:
            return value
        if key in sidecar:
            return sidecar[key]
        if fallback is None:
            raise ValueError(f"the model's t2i_recap.json has no {key!r}; pass it on the command line")
        return fallback

    resolution = int(pick(cfg.resolution, "resolution"))
    return GenSettings(cfg.images_per_prompt, cfg.seed, int(pick(cfg.steps, "num_inference_steps")),
                       float(pick(cfg.guidance, "guidance_scale")), resolution,
                       int(pick(cfg.max_sequence_length, "max_sequence_length", 77)), cfg.batch_size,
                       sidecar.get("text_chunks"), cfg.height or resolution, cfg.width or resolution)


def _check_oracle_size(suite, settings) -> None:
    """The shapes oracle reads a square 3x3 world (t2i_recap.shapes.oracle.to_array stretches any
    other image to a square): on a non-square image that stretch turns circles into ellipses and
    squares into rectangles, so its verdicts would be about the stretch, not the model. Refused."""
    height, width = settings.size
    scored = sum(bool(r.constraints) for r in suite.records)
    if height != width and scored:
        raise ValueError(f"--height {height} --width {width}: the shapes oracle scores {scored} of the suite's prompts "
                         "and reads only square images (its world is a square 3x3 grid; a stretched non-square image "
                         "would misread shapes); use height == width for this suite, or a prompt file without "
                         "scenes/constraints for non-square sizes")


def _swap_scheduler(pipe, name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"--scheduler {name!r} is not a diffusers scheduler class")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _reference(cfg: EvalConfig, suite, resolution: int):
    """(iterable of reference images, description), or (None, None) without a reference."""
    from .metric_fid import iter_reference
    from t2i_recap.shapes.render import render

    spec = cfg.reference
    if spec == "auto":
        spec = "gold" if all(r.scene for r in suite.records) else "none"
    if spec == "none":
        return None, None
    if spec == "gold":
        scenes = [r.gold_scene() for r in suite.records if r.scene][:cfg.max_reference]
        return (render(s, resolution) for s in scenes), "gold renders of the suite's scenes"
    return iter_reference(spec, cfg.max_reference), str(spec)


def _scorers(cfg: EvalConfig, suite, resolution: int):
    """Load every requested metric model and embed the reference images, before any generation,
    so a missing weights file or reference fails in seconds, not after hours of sampling."""
    from .metric_fid import SetDistances, chunks
    from .score import CHUNK, Scorers

    scorers = Scorers(batch_size=cfg.batch_size, oracle_min_confidence=cfg.oracle_min_confidence)
    if cfg.clip:
        from .metric_clip import ClipScorer

        scorers.clip = ClipScorer(cfg.clip, cfg.device)
    if cfg.vqa_model:
        from .metric_vqa import VqaScorer

        scorers.vqa = VqaScorer(cfg.vqa_model, cfg.device)
    if scorers.clip is None and cfg.inception_weights is None:
        return scorers
    distances = SetDistances(scorers.clip, cfg.inception_weights, cfg.fid_antialias, cfg.batch_size)
    reference, scorers.reference_name = _reference(cfg, suite, resolution)
    if reference is None:
        if cfg.inception_weights is not None:
            raise ValueError("FID (--inception-weights) needs reference images: pass --reference FOLDER|SHARDS")
        return scorers
    for chunk in chunks(reference, CHUNK):
        distances.add(chunk, real=True)
    scorers.distances = distances
    return scorers


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_eval(cfg: EvalConfig, argv: list[str] | None = None, generate=None) -> Path:
    """The whole evaluation; returns the path of report.json. `generate(pipe, prompts, seeds,
    settings) -> images` replaces the pipeline call (tests render gold scenes or noise with it)."""
    from .generate import generate_variant, model_info, resolve_model
    from .imageset import scheduler_identity, set_key
    from .protocol import build_variants, cached_recaptions
    from .report import build_report
    from .report_files import write_reports
    from .suites import load_suite, write_suite
    from t2i_recap.generation import load_pipeline

    if not cfg.model or not cfg.out:
        raise ValueError("eval run needs --model and --out")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    save_config(cfg, out / "eval_config.yaml")
    suite = load_suite(cfg.suite, cfg.per_category, cfg.suite_seed)
    write_suite(suite, out / "suite.jsonl")
    model_dir = resolve_model(cfg.model, out)
    info = model_info(model_dir)
    settings = _settings(cfg, info["sidecar"])
    _check_oracle_size(suite, settings)
    scorers = _scorers(cfg, suite, settings.resolution)  # missing metric weights fail before generation
    images_root = Path(cfg.images_root) if cfg.images_root else (
        Path(suite.source).parent if Path(suite.source).is_file() else None)
    texts, recap_meta = cached_recaptions(out, suite, cfg.recaption, resolution=settings.resolution,
                                          images_root=images_root, batch_size=cfg.batch_size,
                                          max_new_tokens=cfg.recaption_max_new_tokens, seed=cfg.seed)
    variants = build_variants(suite, texts, recap_meta)
    pipe, _ = load_pipeline(model_dir, device=cfg.device or _default_device(),
                         dtype=None if cfg.dtype == "float32" else _torch_dtype(cfg.dtype))
    if cfg.scheduler:
        _swap_scheduler(pipe, cfg.scheduler)
    key = set_key(info["digest"], settings, scheduler_identity(pipe))
    gen_started = time.time()
    extra = {"generate": generate} if generate is not None else {}
    generated = {v.name: generate_variant(pipe, out, v.name, v.prompts, settings, key, **extra) for v in variants}
    gen_seconds = time.time() - gen_started
    del pipe
    from .score import score_variant

    results = {}
    for v in variants:
        rows, set_metrics = score_variant(suite, v, out, settings.images_per_prompt, settings.seed, scorers)
        _write_rows(out / f"scores_{v.name}.jsonl", rows)
        results[v.name] = {"rows": rows, "set_metrics": set_metrics, "source": v.source, "skipped": v.skipped,
                           "generation": generated[v.name]}
    report = build_report(cfg=cfg, suite=suite, model=info, settings=settings, variants=results,
                          recaption=recap_meta, scheduler=cfg.scheduler or info["sidecar"].get("scheduler"),
                          timing={"generation_s": gen_seconds, "total_s": time.time() - started,
                                  "images_generated": {k: g["generated"] for k, g in generated.items()}},
                          argv=argv)
    write_reports(report, out)
    return out / "report.json"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


FLAGS = {  # public flag -> EvalConfig field; every other field through --config / --set
    "--model": "model", "--suite": "suite", "--out": "out", "--images-per-prompt": "images_per_prompt",
    "--steps": "steps", "--guidance": "guidance", "--seed": "seed", "--batch-size": "batch_size",
    "--scheduler": "scheduler", "--per-category": "per_category", "--clip": "clip", "--vqa-model": "vqa_model",
    "--reference": "reference", "--inception-weights": "inception_weights", "--recaption": "recaption",
    "--device": "device", "--max-reference": "max_reference", "--height": "height", "--width": "width",
}
REQUIRED = ("--model", "--out")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-recap eval run", description=__doc__.split("\n\n")[0])
    add_config_arguments(ap, EvalConfig, FLAGS, required=REQUIRED)
    return ap


def parse_args(argv: list[str] | None) -> EvalConfig:
    parser = build_parser()
    try:
        return config_from_args(EvalConfig, parser.parse_args(argv))
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    try:
        path = run_eval(cfg, argv)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"t2i-recap eval run: error: {exc}", file=sys.stderr)
        return 2
    report = json.loads(path.read_text(encoding="utf-8"))
    from .report import summary_lines

    print("\n".join(summary_lines(report)))
    print(f"report: {path.parent / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
