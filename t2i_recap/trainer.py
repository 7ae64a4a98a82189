"""The training loop: wires data, features, mixing, model, objective, EMA, checkpoints and validation.

Every random draw of a step (noise, timesteps, posterior sample, caption mix, CFG dropout) comes from
a generator seeded by (seed, rank, step, micro-batch), and the data stream resumes from its cursor,
so a resumed run repeats exactly what an uninterrupted one would have done.

Under accelerate's FSDP2 the model, the optimizer state and the EMA are DTensor shards; saving
gathers full tensors and resuming cuts them again (t2i_recap/fsdp.py), so checkpoints stay the
same full safetensors whatever wrote them, and validation runs on every rank (docs/SCALING.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from tqdm.auto import tqdm

from t2i_recap import cache as feature_cache
from t2i_recap import fsdp, storage, tracking
from t2i_recap.checkpoint import Checkpointer, ResumeConfigError, check_resume_config, rng_state, set_rng_state
from t2i_recap.config import save_config, to_dict
from t2i_recap.buckets import enable_buckets, latent_patch
from t2i_recap.data import build_source, make_loader
from t2i_recap.ema import EMA
from t2i_recap.fast_dit import make_fast
from t2i_recap.generation import check_size, generate_images, image_grid, validation_size
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger
from t2i_recap.lr_schedule import diffusers_name, lr_factor
from t2i_recap.mixing import NAMED_EMPTY, MixCounts, choose_named, select_named
from t2i_recap.models import build_model, compile_blocks, configure_model
from t2i_recap.objectives import build_objective
from t2i_recap.val_loss import ValidationLoss, split_holdout

log = get_logger(__name__)


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (the paper: constant 1e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: none)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps, then the schedule (the paper: no warm-up)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up, from diffusers.optimization.get_scheduler (the paper: constant)."""
    schedule_steps: int | None = None
    """Steps the cosine/linear decay spans (None = trainer.max_steps); set it to stop early on the same curve."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    fused: bool | None = None
    """AdamW's fused kernel (one launch for all parameters): None = on for a CUDA device, off elsewhere."""

    def adamw_kwargs(self, device: torch.device) -> dict:
        """Keyword arguments of the AdamW the trainer builds for parameters on `device`."""
        fused = self.fused if self.fused is not None else torch.device(device).type == "cuda"
        return dict(lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay, eps=self.eps,
                    fused=fused or None)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0; warmup_steps, max_grad_norm and weight_decay >= 0")
        diffusers_name(self.schedule, self.warmup_steps)  # refuses an unknown optim.schedule
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"optim.schedule_steps must be >= 1 (or null for trainer.max_steps), got {self.schedule_steps}")


@dataclasses.dataclass
class TrainerConfig:
    run_dir: str = "runs/dit"
    """Run folder: resolved config, checkpoints, logs, validation grids, summary."""
    max_steps: int = 100_000
    """Optimizer steps to train."""
    batch_size: int = 2048
    """Global batch per optimizer step (the paper: 2048) = micro_batch_size x processes x accumulation."""
    micro_batch_size: int = 64
    """Samples per process per forward pass."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """Autocast precision of the DiT (weights and optimizer stay fp32)."""
    seed: int = 0
    """Base seed; each process uses seed + rank for its own streams."""
    log_every: int = 10
    """Tracker scalars every N steps."""
    log_with: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers by name (tensorboard, wandb, comet_ml, mlflow, aim, clearml, dvclive, ...); TensorBoard
    writes RUN_DIR/logs; wandb follows its environment (WANDB_MODE=offline, WANDB_DIR). [] = none."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs (3x faster fp32 at tiny precision cost)."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss on any process: `stop` raises before the weights change (the newest checkpoint
    stays the last good one); `skip` drops that step's update and goes on (counted in the summary)."""

    def __post_init__(self) -> None:
        if self.on_nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'stop' or 'skip', got {self.on_nonfinite_loss!r}")
        if self.max_steps < 1 or self.batch_size < 1 or self.micro_batch_size < 1 or self.log_every < 1:
            raise ValueError("max_steps, batch_size, micro_batch_size and log_every must be >= 1")
        if storage.is_url(self.run_dir):  # else it would become a local folder named "s3:/..."
            raise ValueError(f"trainer.run_dir={self.run_dir!r}: checkpoints are written to a local or shared POSIX "
                             "folder (atomic renames); shards and sidecars may be URLs, the run folder may not")
        tracking.check_trackers(self.log_with)

    def accumulation(self, world: int) -> int:
        per_step = self.micro_batch_size * world
        if self.batch_size % per_step:
            raise ValueError(f"trainer.batch_size={self.batch_size} is not a multiple of micro_batch_size x processes "
                             f"= {self.micro_batch_size} x {world}")
        return self.batch_size // per_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; raised before the optimizer applies it."""


PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: retry later)."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; every process saved the checkpoint of the step it stopped at."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, "
                         "continue with --resume auto")
        self.step, self.signum = step, signum


class StopFlag:
    """Records SIGTERM/SIGINT instead of dying; the loop stops at the next step boundary.

    Installed for the training loop only (previous handlers are restored after). The flag travels in
    the tensor every step already all-reduces, so all processes stop after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            log.warning("%s received: saving a checkpoint at the end of this step, then exiting",
                        signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class HostCopy:
    """A device tensor copied to pinned host memory without waiting; `get()` waits for that copy only
    (an event recorded behind it), not for the work queued after it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def pin_loader(loader, device: torch.device) -> None:
    """On CUDA, have the DataLoader return page-locked batches (its pin-memory thread copies them), so the
    step's host-to-device copies are asynchronous (non_blocking) instead of waiting for the GPU.
    Set on the loader before its iterator starts (DataLoader reads `pin_memory` there)."""
    if torch.device(device).type == "cuda" and isinstance(loader, torch.utils.data.DataLoader):
        loader.pin_memory = True
        loader.pin_memory_device = ""


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one micro-step, a function of (seed, rank, step, micro) alone, so a
    resumed run draws what the uninterrupted one drew. A CUDA device gets its own stream (word 1)."""
    device = torch.device(device)
    words = [seed, rank, step, micro] + ([1] if device.type != "cpu" else [])
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class Trainer:
    def __init__(self, cfg, resume: str | None = None, allow_changes: bool | list[str] | None = None) -> None:
        self.cfg = cfg
        self.allow_changes = allow_changes
        self.stop = StopFlag()
        t = cfg.trainer
        self.acc = Accelerator(mixed_precision=t.mixed_precision, cpu=_cpu_processes(),
                               gradient_accumulation_steps=t.accumulation(_world_size()),
                               log_with=list(t.log_with) or None, project_dir=t.run_dir)
        o = cfg.optim
        self.lr_factor = lr_factor(o.schedule, o.warmup_steps, o.schedule_steps or t.max_steps)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if t.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.run_dir = Path(t.run_dir)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint)
        if resume is None and self.ckpt.all():
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume latest (or auto), or "
                                  "pick another trainer.run_dir")
        resume_from = self.ckpt.resolve(resume) if resume is not None else None
        if resume_from is not None:  # checked before any model is built: a refused resume costs nothing
            saved = json.loads((resume_from / "state.json").read_text()).get("config")
            changes = check_resume_config(saved, json.loads(json.dumps(to_dict(cfg))), allow_changes)
            if "trainer.max_steps" in changes and cfg.optim.schedule != "constant" and not cfg.optim.schedule_steps \
                    and allow_changes is not True:  # the decay spans max_steps: another one bends the curve
                raise ResumeConfigError(
                    f"--resume: trainer.max_steps changed ({changes['trainer.max_steps'][0]} -> {cfg.trainer.max_steps}) "
                    f"under optim.schedule={cfg.optim.schedule}, whose decay spans max_steps; set optim.schedule_steps "
                    "to fix the span, or pass --resume-allow-changes all")
            for key, (old, new) in changes.items():
                log.warning("resume: %s changed from %r to %r", key, old, new)
        elif resume == "auto":
            log.info("--resume auto: no checkpoint in %s; starting fresh", self.ckpt.dir)
        torch.manual_seed(t.seed + self.rank)
        self.encoder = feature_cache.FeatureEncoder(cfg.features, cfg.text_encoder, self.acc.device)
        if cfg.validation.every_steps >= 0:  # a size the pipeline refuses is found now, not at the first validation
            check_size(*validation_size(cfg.validation, cfg.data.resolution), latent_patch(cfg, self.encoder),
                       "validation")
        self.source, self.empty = self._data()
        self.empty_dev = {k: v.to(self.acc.device) for k, v in self.empty.items()}  # copied once, not every step
        latent_size = cfg.data.resolution // self.encoder.downsample
        model = build_model(cfg.model, latent_channels=self.encoder.latent_channels, latent_size=latent_size,
                            caption_channels=self.encoder.text.hidden_size).to(self.acc.device)
        configure_model(model, cfg.model)
        self.fast = self._fast_blocks(model)
        self.objective = build_objective(cfg.objective)
        self.val_loss = (ValidationLoss(self.heldout, self.encoder, self.objective, cfg.validation,
                                        cfg.data.caption_specs()) if self.heldout is not None else None)
        self.opt = torch.optim.AdamW(model.parameters(), **cfg.optim.adamw_kwargs(self.acc.device))
        if self.acc.distributed_type == DistributedType.FSDP:
            if not self.acc.is_fsdp2:
                raise ValueError("FSDP1 is not supported by the trainer; set fsdp_version: 2 in the accelerate config "
                                 "(docs/accelerate/fsdp_dit_xl.yaml)")
            fsdp.broadcast_weights(model)
        self.compiled = cfg.model.compile_on(self.acc.device)
        if self.compiled:
            compile_blocks(model)
        # Prepared first: under FSDP2 the EMA, the restored weights and the optimizer state are shards.
        self.model, self.opt = self.acc.prepare(model, self.opt)
        if fsdp.is_sharded(self._bare()):
            log.info("FSDP2: the model's parameters are DTensor shards over %d process(es)", self.world)
        self.ema = EMA(self._bare(), cfg.ema) if cfg.ema.enabled else None
        self.step, self.cursor, self.samples, self.counts = 0, (0, 0), 0, MixCounts()
        self.caption_names = tuple(cfg.data.caption_specs())
        self.truncated = {**{name: 0 for name in self.caption_names}, "chosen": 0}
        self.nonfinite_skipped, self.stop_signum = 0, 0
        self._device_state()
        self.validation_failures: list[dict] = []  # steps whose grid failed (reported in summary.json)
        if resume_from is not None:
            self._restore(resume_from)
        if self.acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
            tracking.init_trackers(self.acc, to_dict(cfg))

    def _fast_blocks(self, model: torch.nn.Module) -> bool:
        """Switch the model to t2i_recap.fast_dit's forward when model.fast_blocks resolves on."""
        m = self.cfg.model
        if not m.fast_on(self.acc.device):
            return False
        if self.acc.distributed_type == DistributedType.FSDP:  # its K/V matmul reads every block's weights
            if m.fast_blocks is True:
                raise ValueError("model.fast_blocks=true cannot run under FSDP (each block's weights are sharded); "
                                 "set it to auto or false")
            log.info("model.fast_blocks=auto: off under FSDP")
            return False
        make_fast(model, getattr(torch, m.residual_dtype))
        return True

    def _device_state(self) -> None:
        """The step's device-side records, read by `settle` (see train_step)."""
        dev = self.acc.device
        self.device_skip = self._device_skip()
        self._skipped_dev = torch.zeros((), device=dev)  # skip: non-finite steps since the last settle
        self._halted = torch.zeros((), device=dev)  # stop: 1 once a step was non-finite
        self._bad_step = torch.zeros((), dtype=torch.long, device=dev)  # stop: that step (1-based)
        self._bad_losses = torch.zeros(self.acc.gradient_accumulation_steps, device=dev)  # ... and its losses
        self._pending_counts: HostCopy | None = None
        self._bad: dict = {}
        self._settled = (time.perf_counter(), 0)  # (time, samples) of the last settle

    def _data(self):
        """The batch source (cached features or raw samples) and the empty-caption features."""
        cfg, acc = self.cfg, self.acc
        raw = build_source(cfg.data)
        self.buckets = enable_buckets(cfg, self.encoder, raw)  # before the split: both halves read the same table
        if self.buckets:
            log.info("aspect buckets: %d bins (height x width) %s", len(self.buckets),
                     ", ".join(f"{h}x{w}" for h, w in self.buckets))
        raw, self.heldout = split_holdout(raw, cfg.validation, cfg.data)
        if not cfg.features.cache_dir:
            return raw, self.encoder.empty()
        cache_dir = Path(cfg.features.cache_dir)
        if cfg.data.random_flip:
            raise ValueError("data.random_flip cannot be used with a feature cache (latents are cached unflipped)")
        if acc.is_main_process:
            feature_cache.write_fingerprint(self.encoder, cfg.data, cache_dir)
        acc.wait_for_everyone()
        fp_hash = json.loads((cache_dir / "fingerprint.json").read_text())["hash"]
        summary = feature_cache.prepare_cache(self.encoder, raw, cfg.data, cache_dir, rank=self.rank,
                                              world=self.world, fp_hash=fp_hash)
        if summary["built"]:
            log.info("feature cache: built %d shards (%d rows)", summary["built"], summary["rows"])
        acc.wait_for_everyone()
        if hasattr(raw, "remix"):  # data.sources: the same mixture over each source's cache files
            cached = raw.remix(lambda shards: feature_cache.CacheSource(cache_dir, shards, fp_hash))
        else:
            cached = feature_cache.CacheSource(cache_dir, raw.shards, fp_hash)
        return cached, feature_cache.load_empty(cache_dir)

    def _restore(self, path: Path) -> None:
        # Every rank reads the whole checkpoint and keeps its part (under FSDP: its shards), as under
        # DDP. At DiT-XL/2 that is ~10 GB of host memory per process for a moment.
        ck = Checkpointer.load(path)
        state = ck["state"]
        model = self._bare()
        fsdp.load_model_state(model, ck["model"])
        fsdp.load_optimizer_state(model, self.opt, ck["optimizer"])
        if self.ema is not None:
            if ck["ema"] is None:
                log.warning("checkpoint %s has no EMA; starting the EMA from the restored weights", path)
                self.ema = EMA(model, self.cfg.ema)
            else:
                self.ema.load_state_dict(ck["ema"])
        self.step, self.samples = state["step"], state["samples"]
        self.counts = MixCounts(**state["mix_counts"])
        self.truncated = {**self.truncated, **state["truncated"]}
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        if state["world_size"] == self.world:
            self.cursor = tuple(state["ranks"][self.rank]["cursor"])
            if bool(state.get("config", {}).get("data", {}).get("aspect_buckets")) != bool(self.buckets):
                # the cursor counts samples without buckets and micro-batches with them: not comparable
                log.warning("data.aspect_buckets changed since the checkpoint (allowed by --resume-allow-changes): "
                            "the data stream restarts at the beginning of epoch %d", self.cursor[0])
                self.cursor = (self.cursor[0], 0)
            set_rng_state(state["ranks"][self.rank]["rng"])
        else:  # cursors are per rank; with another world size, restart the data at the next epoch
            epoch = max(r["cursor"][0] for r in state["ranks"]) + 1
            log.warning("checkpoint written by %d processes, resuming with %d: data restarts at epoch %d",
                        state["world_size"], self.world, epoch)
            self.cursor = (epoch, 0)
        log.info("resumed from %s at step %d", path, self.step)

    def _features(self, batch: dict) -> dict:
        if "pixels" in batch:  # on the fly: the same encoder and rounding as the cache
            return self.encoder.encode_batch(batch, self.caption_names)
        return batch

    def _micro_step(self, batch: dict, micro: int) -> tuple[torch.Tensor, MixCounts, dict]:
        f = self._features(batch)
        dev = self.acc.device
        ids = (self.cfg.trainer.seed, self.rank, self.step, micro)
        # Noise, timesteps and the posterior sample are drawn where they are used: on a GPU a CPU draw
        # of batch x latent numbers, then a copy, leaves the GPU idle (measured: DiT-B/4 at batch 512).
        gen = step_generator(*ids)  # caption choice: small, on the CPU beside the features
        noise_gen = gen if dev.type == "cpu" else step_generator(*ids, device=dev)
        x0 = feature_cache.latents_from({k: f[k].to(dev, non_blocking=True) for k in ("mean", "logvar") if k in f},
                                        noise_gen, self.encoder.scaling_factor, self.encoder.shift_factor)
        choice, counts, trunc, keep, padded = self._host_side(f, gen)
        emb, mask = self._captions(f, choice, keep, padded)

        def model_fn(x, t, **cond):
            return self.model(x, timestep=t, added_cond_kwargs=None, return_dict=False, **cond)[0]

        loss = self.objective.loss(model_fn, x0, noise_gen, encoder_hidden_states=emb.float(),
                                   encoder_attention_mask=mask)
        return loss, counts, trunc

    def _host_side(self, f: dict, gen: torch.Generator) -> tuple:
        """Everything of a micro-step the host reads: the caption choice (CFG dropout included), its
        counts, the truncation counts and the padding extent of the chosen captions (how many token
        columns to keep, whether any sample is still padded). All of it comes from the loader's CPU
        tensors and a CPU generator, so none of it waits for the GPU."""
        m = self.cfg.mixing
        choice, counts = choose_named({n: f[f"has_{n}"] for n in self.caption_names}, m.resolved_weights(),
                                      m.cfg_dropout, gen)
        trunc = {n: int(f[f"{n}_truncated"].cpu()[choice.index == i].sum()) for i, n in enumerate(choice.names)}
        if "flagged_recaption" in f:  # data.flagged_recaptions: counted at train time
            counts.flagged_recaptions += int(f["flagged_recaption"].cpu().sum())
        # The chosen masks, on the CPU: small (batch x tokens), unlike the embeddings.
        masks = torch.stack([f[f"{n}_mask"].cpu() for n in choice.names], dim=1)
        mask = masks[torch.arange(masks.shape[0]), choice.index.clamp(min=0)]
        is_empty = (choice.index == NAMED_EMPTY).view(-1, 1)
        mask = torch.where(is_empty, self.empty["mask"].to(mask.dtype).expand_as(mask), mask)
        keep = int(mask.sum(dim=1).max().clamp(min=1))  # right-padded (CLIP and T5 tokenizers pad on the right)
        return choice, counts, trunc, keep, not bool(mask[:, :keep].all())

    def _captions(self, f: dict, choice, keep: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chosen caption features on the device, cut to the `keep` token columns that are not
        padding in every sample (t2i_recap.mixing.trim_padding: masked keys get exactly zero weight, and
        no mask at all lets SDPA take its flash kernel). Only the kept columns travel, as non-blocking
        copies (pinned by the loader on CUDA), and the per-sample pick runs on the device."""
        dev = self.acc.device

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[:, :keep].to(dev, non_blocking=True)

        emb, mask = select_named(choice._replace(index=choice.index.to(dev, non_blocking=True)),
                                 {n: (cut(f[f"{n}_emb"]), cut(f[f"{n}_mask"])) for n in choice.names},
                                 (cut(self.empty_dev["emb"]), cut(self.empty_dev["mask"])))
        return emb, (mask.float() if padded else None)

    def train_step(self, batches) -> dict:
        """One optimizer step over `accumulation` micro-batches.

        Nothing here waits for the GPU: the non-finite check, the skipped update and the EMA's skip
        are device-side flags (the fused AdamW's `found_inf`, as torch.amp.GradScaler uses it), and
        the loss and gradient norm stay device tensors until `settle` reads them at a log,
        checkpoint or validation step. Without a fused optimizer (or under fp16's grad scaler, or
        FSDP) the check reads the flag on the host, as before.
        """
        accum = self.acc.gradient_accumulation_steps
        losses, n, grad_norm, skip = [], 0, None, None
        for micro in range(accum):
            batch = next(batches)
            with self.acc.accumulate(self.model):
                loss, counts, trunc = self._micro_step(batch, micro)
                self.acc.backward(loss)
                losses.append(loss.detach())
                if self.acc.sync_gradients:  # checked before the update, so a bad step never lands
                    if self.cfg.optim.max_grad_norm > 0:
                        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
                    skip = self._nonfinite(torch.stack(losses), grad_norm)
                for group in self.opt.param_groups:
                    group["lr"] = self.lr(self.step)
                self._optimizer_step(skip)
                self.opt.zero_grad(set_to_none=True)
            n += len(batch["key"])
            self.cursor = tuple(batch["cursor"])
            self.counts.add(counts)
            self.counts.dropped_flagged += int(batch.get("dropped_flagged", 0))
            if "bucket" in batch:  # data.aspect_buckets
                self.counts.buckets[batch["bucket"]] = self.counts.buckets.get(batch["bucket"], 0) + len(batch["key"])
                self.counts.bucket_remainder += int(batch["bucket_remainder"])
            for k, v in trunc.items():
                self.truncated[k] += v
                self.truncated["chosen"] += v
        if self.ema is not None and skip is not True:
            self.ema.update(self._bare(), self.step + 1, skip=skip if isinstance(skip, torch.Tensor) else None)
        self.step += 1
        self._count_samples(n)
        loss = self.acc.reduce(torch.stack(losses).mean(), reduction="mean")
        return {"loss": loss, "lr": self.lr(self.step - 1),
                "grad_norm": grad_norm.detach() if grad_norm is not None else float("nan")}

    def _optimizer_step(self, skip: torch.Tensor | bool | None) -> None:
        """AdamW's step; `skip` True drops it, a device flag makes the fused kernel drop it on the GPU."""
        if isinstance(skip, torch.Tensor):
            inner = self.opt.optimizer  # accelerate's wrapper steps it only when the gradients are synced
            inner.found_inf = skip  # the fused AdamW leaves weights, moments and step counts as they were
            try:
                self.opt.step()
            finally:
                del inner.found_inf
        elif not skip:
            self.opt.step()

    def _device_skip(self) -> bool:
        """Whether a non-finite step is dropped on the device (no host sync) rather than on the host."""
        fused = any(g.get("fused") for g in self.opt.param_groups)
        return bool(fused) and self.acc.scaler is None and self.acc.distributed_type != DistributedType.FSDP

    def _nonfinite(self, losses: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor | bool:
        """Flag this step when any process saw a NaN/inf loss (or gradient norm), all agreeing.

        Device path: returns the 0/1 skip flag as a tensor and records the event on the device (under
        `stop`, every later update is dropped too, so the weights stay those before the bad step, and
        `settle` raises). Host path: reads the flag now and returns a bool (or raises)."""
        bad = ~torch.isfinite(losses).all()
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach()).all()
        bad = self.acc.reduce(bad.float().reshape(1), reduction="sum").clamp(max=1).reshape(())
        if not self.device_skip:
            if float(bad) == 0:
                return False
            self._bad = {"first": self.step + 1, "losses": losses}
            self._raise_or_count()
            return True
        if self.cfg.trainer.on_nonfinite_loss == "skip":
            self._skipped_dev += bad
            return bad
        first = bad * (1 - self._halted)  # the first bad step of this run
        self._bad_step = torch.where(first > 0, self.step + 1, self._bad_step)
        self._bad_losses = torch.where(first > 0, losses.float(), self._bad_losses)
        self._halted = torch.maximum(self._halted, bad)
        return self._halted

    def _raise_or_count(self) -> None:
        """`skip`: count and warn; `stop`: raise NonFiniteLossError naming the first bad step."""
        values = [float(v) for v in self._bad["losses"]]
        if self.cfg.trainer.on_nonfinite_loss == "skip":
            self.nonfinite_skipped += 1
            log.warning("step %d: non-finite loss %s; update skipped (%d skipped so far)", self._bad["first"], values,
                        self.nonfinite_skipped)
            return
        found = self.ckpt.all()
        last = str(found[-1][1]) if found else "none yet"
        raise NonFiniteLossError(
            f"step {self._bad['first']}: the training loss is not finite ({values} on rank {self.rank}); stopped "
            f"before the update. Last good checkpoint: {last}. Resume it with --resume latest (e.g. with a lower "
            "optim.lr or mixed_precision=no), or set trainer.on_nonfinite_loss=skip to skip such steps.")

    def _count_samples(self, n: int) -> None:
        """Samples of this step over all processes, and the stop flag, which travels with them so that
        every process sees any one's signal. One process: both are host numbers already. More: one
        all-reduce, read back a step later (a copy that waits for that step only), so all processes
        stop after the same step and nothing waits for the step in flight."""
        if self.world == 1:
            self.samples += n
            self.stop_signum = self.stop.signum
            return
        dev = self.acc.device
        local = torch.tensor([n, self.stop.signum], pin_memory=dev.type == "cuda").to(dev, non_blocking=True)
        pending = HostCopy(self.acc.reduce(local, reduction="sum"))
        self._take_counts()
        self._pending_counts = pending

    def _take_counts(self) -> None:
        """Add the reduced sample count and stop flag of the step still pending, if any."""
        if self._pending_counts is not None:
            global_n, signum = self._pending_counts.get().tolist()
            self._pending_counts = None
            self.samples += int(global_n)
            self.stop_signum = int(signum)

    def settle(self, metrics: dict) -> dict:
        """Wait for the device: host numbers for `metrics` (loss, grad norm, img/s since the last
        settle), the sample count, and the non-finite record (a `stop` run raises here, before any
        checkpoint of the step is written; `skip` counts and warns)."""
        self._take_counts()
        if self.device_skip:
            if self.cfg.trainer.on_nonfinite_loss == "skip":
                skipped = int(self._skipped_dev)
                if skipped:
                    self._skipped_dev.zero_()
                    self.nonfinite_skipped += skipped
                    log.warning("%d step(s) up to step %d had a non-finite loss; their updates were skipped (%d "
                                "skipped so far)", skipped, self.step, self.nonfinite_skipped)
            elif float(self._halted):
                self._bad = {"first": int(self._bad_step), "losses": self._bad_losses}
                self._raise_or_count()
        now = time.perf_counter()
        out = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        out["img_per_s"] = (self.samples - self._settled[1]) / max(now - self._settled[0], 1e-9)
        self._settled = (now, self.samples)
        return out

    def _bare(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def lr(self, step: int) -> float:
        """The lr of update `step` (0-based): a function of the step alone, so resuming needs no scheduler state."""
        return self.cfg.optim.lr * self.lr_factor(step)

    def save(self) -> None:
        self._take_counts()
        ranks = gather_object([{"rank": self.rank, "cursor": list(self.cursor), "rng": rng_state()}])
        model = self._bare()  # every rank: under FSDP, gathering the full state is a collective
        weights, optimizer = fsdp.model_state(model), fsdp.optimizer_state(model, self.opt)
        ema = self.ema.state_dict() if self.ema else None
        if self.acc.is_main_process:
            state = {"world_size": self.world, "ranks": sorted(ranks, key=lambda r: r["rank"]),
                     "samples": self.samples, "mix_counts": dataclasses.asdict(self.counts),
                     "truncated": self.truncated, "nonfinite_skipped": self.nonfinite_skipped,
                     "config": json.loads(json.dumps(to_dict(self.cfg))),
                     "lr_scheduler": {"last_epoch": self.step, "lr": self.lr(self.step)}}  # LambdaLR's whole state
            self.ckpt.save(self.step, model=weights, ema=ema, optimizer=optimizer, state=state)
        self.acc.wait_for_everyone()

    def validate(self) -> None:
        """A grid of fixed prompts x seeds (EMA weights when kept), written by the main process.

        Under FSDP every rank runs the same pipeline calls: each forward of the sharded model gathers
        its weights from all ranks, so all must take part (the images are the same on every rank).
        """
        model = self._bare()
        try:
            if self.acc.is_main_process or fsdp.is_sharded(model):
                images = self._generate(model)
            if self.acc.is_main_process:
                self._save_grid(images)
        except Exception as exc:  # a grid is a by-product: never lose the run over it
            if fsdp.is_sharded(model):
                raise  # the other ranks may be inside the same collective forward: stopping is the safe way
            model.train()
            self.validation_failures.append({"step": self.step, "error": f"{type(exc).__name__}: {exc}"})
            log.error("validation at step %d failed (%s: %s); training goes on and the checkpoints are kept",
                      self.step, type(exc).__name__, exc)
        self.acc.wait_for_everyone()

    def _save_grid(self, images: list) -> None:
        v = self.cfg.validation
        grid = image_grid(images, cols=len(v.prompts))
        out = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        tracking.log_image(self.acc, "validation", grid, self.step)

    def _generate(self, model: torch.nn.Module) -> list:
        from contextlib import nullcontext

        from diffusers import PixArtAlphaPipeline

        v = self.cfg.validation
        height, width = validation_size(v, self.cfg.data.resolution)
        model.eval()
        with self.ema.applied(model) if self.ema else nullcontext():
            pipe = PixArtAlphaPipeline(tokenizer=self.encoder.text.tokenizer, text_encoder=self.encoder.text.model,
                                       vae=self.encoder.vae, transformer=model, scheduler=self.objective.scheduler())
            pipe.set_progress_bar_config(disable=True)
            prompts = [p for _ in v.seeds for p in v.prompts]
            seeds = [s for s in v.seeds for _ in v.prompts]
            images = generate_images(pipe, prompts, seeds, num_inference_steps=v.num_inference_steps,
                                     guidance_scale=v.guidance_scale, resolution=self.cfg.data.resolution,
                                     max_sequence_length=self.encoder.text.max_length, batch_size=v.batch_size,
                                     text_chunks=self.encoder.text.chunks, height=height, width=width)
        fsdp.reshard(model)  # under FSDP, drop the EMA weights the root module kept gathered
        model.train()
        return images

    def log(self, metrics: dict) -> None:
        if not self.acc.is_main_process:
            return
        total = max(self.counts.total(), 1)
        non_empty = max(self.counts.original + self.counts.recaption, 1)
        metrics = {**metrics, "mix/original_share": self.counts.original / total,
                   "mix/recaption_share": self.counts.recaption / total, "mix/empty_share": self.counts.empty / total,
                   "mix/fallbacks": self.counts.fallback_total(),
                   **{f"mix/{name}_share": n / total for name, n in self.counts.chosen.items()},
                   "truncation/chosen_share": self.truncated["chosen"] / non_empty,
                   "truncation/original_share": self.truncated["original"] / max(self.counts.original, 1),
                   "truncation/recaption_share": self.truncated["recaption"] / max(self.counts.recaption, 1)}
        tracking.log_scalars(self.acc, metrics, self.step)

    def fit(self) -> dict:
        t = self.cfg.trainer
        loader = make_loader(self.source, batch_size=t.micro_batch_size, seed=t.seed, rank=self.rank, world=self.world,
                             buffer=self.cfg.data.shuffle_buffer, num_workers=self.cfg.data.num_workers,
                             start=self.cursor, random_flip=self.cfg.data.random_flip, bucketed=bool(self.buckets),
                             window=self.cfg.data.bucket_window)
        pin_loader(loader, self.acc.device)
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.acc.is_local_main_process, dynamic_ncols=True)
        metrics: dict = {}
        self._settled = (time.perf_counter(), self.samples)
        # Installed before the data workers fork: SLURM signals every process of the job, and a worker
        # that died of it would kill the step; the workers inherit the handler and stop with the loader.
        with self.stop:
            batches = iter(loader)
            while self.step < t.max_steps:
                metrics = self.train_step(batches)
                if self.stop_signum:
                    self._preempt(bar)
                metrics = self._after_step(metrics, bar)
        bar.close()
        return self._finish(metrics)

    def _preempt(self, bar) -> None:
        """A signal reached some process: all save this step's checkpoint together, then stop."""
        bar.close()
        self.settle({})  # a `stop` run with a non-finite step raises that instead
        self.save()  # a collective: every process reached this same step (the flag was all-reduced)
        self.acc.end_training()  # closes the trackers (main process)
        # The summed flag is a signal number only when one process got it; name what this one got.
        raise Preempted(self.step, self.stop.signum or signal.SIGTERM)

    def _after_step(self, metrics: dict, bar) -> dict:
        """Log, checkpoint and validate when due; only those steps read from the device (`settle`)."""
        t, v = self.cfg.trainer, self.cfg.validation
        bar.update(1)
        last = self.step == t.max_steps
        log_now = self.step % t.log_every == 0 or last
        save_now = self.step % self.cfg.checkpoint.every_steps == 0 or last
        validate_now = v.every_steps >= 0 and ((v.every_steps and self.step % v.every_steps == 0) or last)
        loss_now = self.val_loss is not None and self.val_loss.due(self.step, last)
        if not (log_now or save_now or validate_now or loss_now):
            return metrics
        metrics = self.settle(metrics)
        if loss_now:
            metrics.update(self.validation_loss())
            log_now = True  # logged beside the step's metrics, and so beside the image grid
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
        if log_now:
            self.log(metrics)
        if save_now:
            self.save()
        if validate_now:
            self.validate()
        return metrics

    def validation_loss(self) -> dict[str, float]:
        """The held-out loss of the current weights (every process computes it: FSDP forwards are collective)."""
        model = self._bare()
        model.eval()

        def model_fn(x, t, **cond):
            return model(x, timestep=t, added_cond_kwargs=None, return_dict=False, **cond)[0]

        with self.acc.autocast():
            out = self.val_loss.compute(model_fn, self.acc.device)
        model.train()
        self.val_loss.history.append({"step": self.step, **out})
        return out

    def _finish(self, metrics: dict) -> dict:
        summary = {"step": self.step, "samples": self.samples, "last": metrics,
                   "mix_counts": dataclasses.asdict(self.counts), "truncated": self.truncated,
                   "nonfinite_skipped": self.nonfinite_skipped, "validation_failures": self.validation_failures,
                   "processes": self.world, "run_dir": str(self.run_dir),
                   "speed": {"compile": self.compiled, "fast_blocks": self.fast, "device_skip": self.device_skip}}
        if self.val_loss is not None:
            summary["validation_loss"] = self.val_loss.history
        if self.acc.is_main_process:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.acc.wait_for_everyone()
        self.acc.end_training()  # closes the trackers; accelerate also tears the process group down here
        return summary


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cpu_processes() -> bool:
    """Whether to run on CPU; mends (or refuses) a launch that silently lost its extra processes.

    accelerate only forms a CPU process group with cpu=True and WORLD_SIZE > 1, so without CUDA we
    pass cpu=True: then `accelerate launch --multi_gpu --num_processes 2` and `torchrun` give N CPU
    processes. `accelerate launch --cpu --num_processes 2` instead starts ONE process (its simple
    launcher expects MPI); `check_cpu_launch` relaunches that one as N torchrun processes (or refuses).
    """
    from t2i_recap.launch import check_cpu_launch

    check_cpu_launch("t2i_recap.train")
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return use_cpu or not torch.cuda.is_available()


def train(cfg, resume: str | None = None, allow_changes: bool | list[str] | None = None) -> dict:
    return Trainer(cfg, resume, allow_changes).fit()
