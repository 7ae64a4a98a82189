"""`t2i-recap caption finetune`: train a LLaVA-architecture captioner on (image, caption) pairs.

The paper's captioner is LLaVA-1.5 (CLIP vision tower, frozen; `mlp2x_gelu` projector; LLaMA-3
decoder), fine-tuned on image-caption pairs (docs/references.md section 1). This module fine-tunes any
`LlavaForConditionalGeneration` folder, fully or with LoRA (peft), or first assembles a new one
from a CLIP model's vision tower + a fresh 2-layer MLP projector + a fresh small LLaMA decoder
(`build_captioner`): that is how the shapes world gets its tiny captioner. Either way the result
is a standard transformers folder (model + `LlavaProcessor` with its chat template) that
`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load.

The loss covers the answer tokens only (prompt and image tokens are masked with -100), and the
prompt is the one recaptioning uses (`build_prompt(preset)`, the paper's prompt by default), put
through the processor's chat template, so training and inference see the same token sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError, save_config, to_dict
from t2i_recap.io import atomic_write_text, check_replaceable, output_dir
from t2i_recap.logging_utils import get_logger, setup_logging

from .finetune_config import FinetuneConfig, TrainSettings
from .finetune_data import Batcher, Example, read_pairs
from .finetune_model import build_captioner, cache_vision_features, forward, load_captioner, set_trainable

log = get_logger(__name__)


# ----------------------------------------------------------------------------- training

def batches(examples: list, o: TrainSettings):
    """Index lists of one batch each: shuffled epochs, stopping after max_steps if set."""
    rng = random.Random(o.seed)
    steps = 0
    for epoch in range(o.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), o.batch_size):
            if o.max_steps is not None and steps >= o.max_steps:
                return
            steps += 1
            yield epoch, order[i : i + o.batch_size]


def num_steps(num_examples: int, o: TrainSettings) -> int:
    total = math.ceil(num_examples / o.batch_size) * o.epochs
    return min(total, o.max_steps) if o.max_steps is not None else total


def train(model, batcher: Batcher, examples: list[Example], o: TrainSettings) -> dict:
    """The loop: shuffled epochs, AdamW, warm-up + cosine, grad clip. Returns a summary."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: vision tower, projector and language model are all frozen")
    total = num_steps(len(examples), o)
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(o.warmup_steps, total // 2), total, min_lr_rate=0.1)
    model.train()
    losses: list[float] = []
    epoch_losses: dict[int, list[float]] = {}
    start = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step")
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and o.mixed_precision == "bf16")
    for epoch, idx in batches(examples, o):
        batch = {k: v.to(device, non_blocking=True) for k, v in batcher.collate([examples[j] for j in idx]).items()}
        with autocast:
            loss = forward(model, batch)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        epoch_losses.setdefault(epoch, []).append(losses[-1])
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    means = {e: sum(v) / len(v) for e, v in epoch_losses.items()}
    log.info("mean answer loss per epoch: %s", ", ".join(f"{v:.4f}" for v in means.values()))
    return {"steps": total, "epochs_run": len(means), "seconds": round(time.perf_counter() - start, 1),
            "first_loss": losses[0], "final_loss": means[max(means)], "epoch_losses": list(means.values()),
            "trainable_parameters": sum(p.numel() for p in params), "device": str(device)}


OUTPUT_KIND = "captioner"


def _inputs(cfg: FinetuneConfig) -> tuple[str, ...]:
    """Local folders this run reads, which its output must never replace."""
    return tuple(p for p in (cfg.model, cfg.build.clip) if p and Path(p).exists())


def save(model, processor, out: Path, cfg: FinetuneConfig, summary: dict) -> None:
    """Write the folder beside `out` and rename it into place, so `out` is complete or absent; an
    existing `out` is replaced only when it is an earlier fine-tune's output (io.output_dir)."""
    with output_dir(out, kind=OUTPUT_KIND, overwrite=True, protect=_inputs(cfg)) as tmp:
        if cfg.lora.enabled and hasattr(model, "merge_and_unload"):
            if not cfg.lora.merge:
                model.save_pretrained(str(tmp / "adapter"))  # adapter_model.safetensors + adapter_config.json
            model = model.merge_and_unload()
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        save_config(cfg, tmp / "finetune_config.yaml")
        atomic_write_text(tmp / "finetune.json", json.dumps(summary, indent=2, sort_keys=True))


def finetune(cfg: FinetuneConfig, out: str | Path) -> dict:
    """Read pairs, build or load the captioner, train, save to `out`. Returns the summary."""
    out = Path(out)
    check_replaceable(out, kind=OUTPUT_KIND, overwrite=True, protect=_inputs(cfg))  # before training, not after
    pairs, skipped = read_pairs(cfg.data)
    if not pairs:
        raise ValueError(f"{cfg.data.shards}: no usable (image, caption) pairs (skipped: {dict(skipped)})")
    log.info("%d pairs from %s (skipped: %s)", len(pairs), cfg.data.shards, dict(skipped))
    model, processor = load_captioner(cfg.model) if cfg.model else build_captioner(cfg.build)
    model = set_trainable(model, cfg).to(cfg.train.resolved_device())
    batcher = Batcher(processor, cfg.prompt_preset, cfg.train.max_length)
    examples = batcher.encode(pairs)
    if cfg.train.freeze_vision:
        cache_vision_features(model, examples)
    summary = train(model, batcher, examples, cfg.train)
    summary.update(pairs=len(pairs), skipped=dict(skipped), captions_truncated=batcher.truncated,
                   lora=("merged" if cfg.lora.merge else "merged + adapter/") if cfg.lora.enabled else None,
                   config=to_dict(cfg))
    save(model.cpu(), processor, out, cfg, summary)
    log.info("saved the captioner to %s (final answer loss %.4f, %.0f s)", out, summary["final_loss"],
             summary["seconds"])
    return summary


@dataclasses.dataclass
class FinetuneOptions:
    """Where one `t2i-recap caption finetune` call writes (not part of the saved finetune_config.yaml)."""

    out: str = ""
    """Output folder (a transformers model folder)."""
    overwrite: bool = False
    """Retrain even if OUT holds a finished run."""


FLAGS = {"--shards": "data.shards", "--clip": "build.clip", "--model": "model"}
OPTIONS = {"--out": "out", "--overwrite": "overwrite"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i-recap caption finetune", description=__doc__.split("\n")[0])
    add_config_arguments(parser, FinetuneConfig, FLAGS, config_help="YAML file or recipe name (configs/caption/finetune_*.yaml)")
    add_options(parser, FinetuneOptions, OPTIONS, required=("--out",))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = options_from_args(FinetuneOptions, ns)
    setup_logging()
    try:
        cfg = config_from_args(FinetuneConfig, ns)
    except ConfigError as exc:
        parser.error(str(exc))
    if (Path(args.out) / "finetune.json").is_file() and not args.overwrite:
        print(f"{args.out} already holds a finished fine-tune (finetune.json); pass --overwrite to retrain")
        return 0
    summary = finetune(cfg, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
