"""`t2i-recap clip train --config FILE`: contrastive CLIP training on shards, under accelerate.

The data layer is the DiT trainer's (`t2i_recap.data`: shards, recaption sidecars, caption specs,
cursor-based exact resume) and so is the caption mixer (`t2i_recap.mixing.choose`, the paper's p
per sample per step, drawn from `step_generator(seed, rank, step, 0)`), so a resumed run repeats
what an uninterrupted one would have done. Checkpoints are the trainer's safetensors + JSON
folders (`t2i_recap.checkpoint.Checkpointer`). The end of a run writes `run_dir/export/`, a
CLIPModel + CLIPProcessor folder that `CLIPModel.from_pretrained` loads.

The contrastive loss is CLIPModel's own (symmetric InfoNCE with its learned temperature) over each
process's batch: negatives come from the same process (no cross-process feature gather).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from t2i_recap.checkpoint import Checkpointer, rng_state, set_rng_state
from t2i_recap.clip.config import ClipTrainConfig
from t2i_recap.clip.model import build_model, build_processor, load_tokenizer
from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError, save_config, to_dict
from t2i_recap.data import build_source, make_loader
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.mixing import ORIGINAL, MixCounts, choose
from t2i_recap.shapes.train_clip import save_clip
from t2i_recap.trainer import step_generator

log = get_logger(__name__)


def mixed_captions(batch: dict, cfg: ClipTrainConfig, gen: torch.Generator) -> tuple[list[str], MixCounts]:
    """Each sample's caption for this step: original with probability p, else the recaption."""
    has_o = torch.tensor([c is not None for c in batch["original"]])
    has_r = torch.tensor([c is not None for c in batch["recaption"]])
    choice, counts = choose(has_o, has_r, cfg.mixing, gen)
    texts = [o if int(c) == ORIGINAL else r for c, o, r in zip(choice, batch["original"], batch["recaption"])]
    return texts, counts


class ClipTrainer:
    def __init__(self, cfg: ClipTrainConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        t = cfg.trainer
        self.acc = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.run_dir = Path(t.run_dir)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint)
        if resume is None and self.ckpt.all():
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume latest, or pick "
                                  "another trainer.run_dir")
        torch.manual_seed(t.seed)  # the same initial weights on every process
        self.tokenizer = load_tokenizer(cfg.model)
        self.processor = build_processor(cfg.model)
        self.source = build_source(cfg.data)
        model = build_model(cfg.model, self.tokenizer)
        opt = torch.optim.AdamW(model.parameters(), **cfg.optim.adamw_kwargs(self.acc.device))
        self.model, self.opt = self.acc.prepare(model, opt)
        self.step, self.cursor, self.counts = 0, (0, 0), MixCounts()
        self.losses: list[float] = []
        if resume is not None:
            self._restore(self.ckpt.resolve(resume))
        if self.acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")

    def _restore(self, path: Path) -> None:
        ck = Checkpointer.load(path)
        state = ck["state"]
        self.acc.unwrap_model(self.model).load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step, self.counts, self.losses = state["step"], MixCounts(**state["mix_counts"]), state["losses"]
        if state["world_size"] != self.world:
            raise ValueError(f"{path} was written by {state['world_size']} processes; resume it with the same number "
                             f"(got {self.world}): each process's data cursor belongs to its rank")
        self.cursor = tuple(state["ranks"][self.rank]["cursor"])
        set_rng_state(state["ranks"][self.rank]["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def lr(self, step: int) -> float:
        o, t = self.cfg.optim, self.cfg.trainer
        if o.warmup_steps and step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        if t.schedule == "constant":
            return o.lr
        progress = (step - o.warmup_steps) / max(1, t.max_steps - o.warmup_steps)
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """The CLIPImageProcessor on the decoded (B, 3, R, R) [-1, 1] tensors: resize, crop, normalise."""
        images = [((p + 1) / 2).clamp(0, 1).numpy() for p in pixels.cpu()]
        return self.processor(images=images, do_rescale=False, input_data_format="channels_first",
                              return_tensors="pt").pixel_values

    def train_step(self, batch: dict) -> float:
        gen = step_generator(self.cfg.trainer.seed, self.rank, self.step, 0)
        texts, counts = mixed_captions(batch, self.cfg, gen)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.model.text_max_length,
                             return_tensors="pt").to(self.acc.device)
        pixels = self.pixel_values(batch["pixels"]).to(self.acc.device)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.step)
        with self.acc.autocast():
            loss = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels,
                              return_loss=True).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: the CLIP loss is not finite ({float(loss)}); stopped "
                                     "before the update")
        self.acc.backward(loss)
        if self.cfg.optim.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.cursor = tuple(batch["cursor"])
        self.counts.add(counts)
        self.step += 1
        return float(self.acc.reduce(loss.detach(), reduction="mean"))

    def save(self) -> None:
        ranks = gather_object([{"rank": self.rank, "cursor": list(self.cursor), "rng": rng_state()}])
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            state = {"world_size": self.world, "ranks": sorted(ranks, key=lambda r: r["rank"]),
                     "mix_counts": dataclasses.asdict(self.counts), "losses": self.losses,
                     "config": json.loads(json.dumps(to_dict(self.cfg)))}
            self.ckpt.save(self.step, model=model.state_dict(), ema=None, optimizer=self.opt.state_dict(),
                           state=state)
        self.acc.wait_for_everyone()

    def export(self) -> Path:
        """run_dir/export: CLIPModel + CLIPProcessor, written under a temporary name, then renamed."""
        final = self.run_dir / "export"
        tmp = self.run_dir / f".tmp-export-{os.getpid()}"
        save_clip(self.acc.unwrap_model(self.model), self.tokenizer, self.processor, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def fit(self) -> dict:
        t = self.cfg.trainer
        loader = make_loader(self.source, batch_size=t.batch_size, seed=t.seed, rank=self.rank, world=self.world,
                             buffer=self.cfg.data.shuffle_buffer, num_workers=self.cfg.data.num_workers,
                             start=self.cursor, random_flip=self.cfg.data.random_flip)
        batches = iter(loader)
        self.model.train()
        while self.step < t.max_steps:
            self.losses.append(self.train_step(next(batches)))
            if self.step % t.log_every == 0:
                log.info("step %d loss %.4f lr %.2e", self.step, self.losses[-1], self.lr(self.step - 1))
            if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == t.max_steps:
                self.save()
        summary = {"step": self.step, "losses": self.losses, "mix_counts": dataclasses.asdict(self.counts),
                   "processes": self.world, "run_dir": str(self.run_dir)}
        if self.acc.is_main_process:
            summary["export"] = str(self.export())
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.acc.wait_for_everyone()
        return summary


def train(cfg: ClipTrainConfig, resume: str | None = None) -> dict:
    return ClipTrainer(cfg, resume).fit()


@dataclasses.dataclass
class ClipTrainOptions:
    """How one `t2i-recap clip train` call starts (not part of the saved run config)."""

    resume: str | None = None
    """"latest" or a checkpoint folder."""


FLAGS: dict[str, str] = {}  # every ClipTrainConfig field through --config / --set
OPTIONS = {"--resume": "resume"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-recap clip train", description=__doc__.split("\n")[0])
    add_config_arguments(ap, ClipTrainConfig, FLAGS, config_required=True,
                         config_help="YAML recipe (e.g. configs/clip/shapes_tiny.yaml) or its name")
    add_options(ap, ClipTrainOptions, OPTIONS)
    return ap


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(ClipTrainConfig, args)
    except ConfigError as exc:
        parser.error(str(exc))
    summary = train(cfg, options_from_args(ClipTrainOptions, args).resume)
    log.info("trained %d steps; export: %s", summary["step"], summary.get("export"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
