"""`t2i-recap caption run`: recaption every shard of an input into one sidecar per shard.

    t2i-recap caption run --input 'shards/{00000..00099}.tar' --out recaps --model PATH_OR_ID
    accelerate launch -m t2i_recap.captioner --input shards --out recaps --model PATH_OR_ID

Resume: a shard whose sidecar exists is skipped; a killed run redoes only the shards it had not
finished (sidecars appear atomically). Scale-out: shard i goes to rank i % world_size (ranks from
accelerate/torchrun's RANK and WORLD_SIZE), a stable split with no overlap and no gap, whatever
was finished before. Processes that overlap (two runs on one --out) share the work through
per-shard claims (`t2i_recap.claims`): no shard is captioned twice, and a dead process's shard is
taken over. SIGTERM/SIGINT stop at the next batch boundary: finished sidecars stay, the current
shard leaves nothing visible, and the exit code is 128 + the signal number (143 for SIGTERM).

    t2i-recap caption run --engine ray --workers 8 --input ... --out recaps --model PATH_OR_ID

`--engine ray` (`captioner.ray_engine`): this process drives Ray workers, one model replica each,
handing out the next unfinished shard to whichever worker frees up; a dead worker's shard is
handed out again. Each shard goes through the same `caption_shard` and the same claims as above.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Literal

from tqdm import tqdm

from t2i_recap.claims import ClaimConfig, ClaimLost, Claims
from t2i_recap import cli_config
from t2i_recap.config import ConfigError, save_config
from t2i_recap.identity import describe, model_digest, stamp
from t2i_recap.extras import MissingExtraError, require
from t2i_recap.io import DiskFullError
from t2i_recap import storage
from t2i_recap.logging_utils import get_logger, setup_logging

from .prompts import DEFAULT_MAX_HINT_CHARS, build_prompt_with_notes, check_template
from .ray_engine import Driver, RaySettings, ShardReply, WorkerStartError, connect
from .readers import ReaderConfig, Sample, Shard, open_shards
from .repetition import is_repetitive
from .writer import Row, read_info, remove_stale_temps, sidecar_path, stale_reason, write_sidecar

log = get_logger(__name__)


@dataclasses.dataclass
class CaptionRunConfig:
    """One recaptioning run."""

    input: str = ""
    """Shards: a folder, glob or brace pattern of .tar/.parquet, an image folder, or an HF dataset."""
    out: str = ""
    """Folder for the sidecars (`<shard>.parquet`)."""
    model: str = ""
    """Captioner: local folder or hub id of any image-text-to-text model transformers loads."""
    backend: Literal["transformers"] = "transformers"
    """Generation engine; the boundary (`backend.CaptionBackend`) leaves room for vLLM/SGLang."""
    prompt: Literal["recap", "conditioned", "custom"] = "recap"
    """`recap`: the paper's prompt verbatim; `conditioned`: alt-text as a hint; `custom`: `template`."""
    template: str | None = None
    """Custom prompt; `{org_caption}` is replaced by the original caption."""
    batch_size: int = 16
    """Images per `generate` call."""
    max_new_tokens: int = 128
    """Generation cap (the paper: 128). Captions that hit it get finish_reason "length"."""
    max_hint_chars: int = DEFAULT_MAX_HINT_CHARS
    """Longest original caption put into a conditioned prompt."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32."""
    device: str | None = None
    """Torch device; default cuda:LOCAL_RANK when a GPU exists, else cpu."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel; falls back to the model's default where SDPA is unsupported."""
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache layout: static preallocates prompt + max_new_tokens positions once (no per-step concatenation);
    greedy tokens are the same either way."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint (off unless asked)."""
    prefetch_batches: int = 2
    """Batches read and decoded ahead in a background thread, so decoding overlaps generation."""
    reader: ReaderConfig = dataclasses.field(default_factory=ReaderConfig)
    """How the input is read."""
    claims: ClaimConfig = dataclasses.field(default_factory=ClaimConfig)
    """Heartbeat and stale timeout of the per-shard claims that keep overlapping runs apart."""
    claims_dir: str | None = None
    """Local or shared POSIX folder for the claims when `out` is an object store (s3://): claims need O_EXCL
    files. Unset: one process keeps them in a private temp folder; several processes are refused
    (`t2i_recap.storage.claims_root`)."""
    allow_empty_shards: bool = False
    """A shard where every sample was skipped is an error (exit 1) unless this is set."""
    engine: Literal["accelerate", "ray"] = "accelerate"
    """`accelerate`: this process captions shard i of every WORLD_SIZE (accelerate launch, torchrun, or
    alone); `ray`: this process drives Ray workers, handing each the next shard as it frees up."""
    workers: int | None = None
    """engine ray: workers, each holding one model replica; default one per GPU of the cluster, or 1
    where it has none."""
    ray_address: str | None = None
    """engine ray: the cluster to join (`auto`, `HOST:6379`, `ray://HOST:10001`); default: the one in
    RAY_ADDRESS if set, else a local Ray instance started for this run."""
    ray_max_retries: int = 2
    """engine ray: times a shard is handed out again after the worker captioning it died (killed,
    out of memory, node lost); past that the shard is reported failed with the reasons."""
    ray_cpus_per_worker: float = 1.0
    """engine ray: CPUs reserved for each worker (on the CPU, also its torch threads)."""
    ray_gpus_per_worker: float | None = None
    """engine ray: GPUs reserved for each worker; default 1 where the cluster has GPUs, else 0."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")
        self._check_engine()
        if self.prompt == "custom":
            if not self.template:
                raise ValueError("prompt 'custom' needs a template")
            check_template(self.template)

    def _check_engine(self) -> None:
        if self.engine not in ("accelerate", "ray"):
            raise ValueError(f"engine must be 'accelerate' or 'ray', got {self.engine!r}")
        if self.engine != "ray":
            given = [f"{name}={getattr(self, name)!r}" for name in ("workers", "ray_address")
                     if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for engine ray (pass --engine ray); under accelerate "
                                 "the launcher's process count sets the workers")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.ray_max_retries < 0:
            raise ValueError(f"ray_max_retries must be >= 0, got {self.ray_max_retries}")
        if self.ray_cpus_per_worker <= 0:
            raise ValueError(f"ray_cpus_per_worker must be > 0, got {self.ray_cpus_per_worker}")
        if self.ray_gpus_per_worker is not None and self.ray_gpus_per_worker < 0:
            raise ValueError(f"ray_gpus_per_worker must be >= 0, got {self.ray_gpus_per_worker}")

    def fingerprint(self) -> dict:
        """Settings that change the captions: a finished sidecar is reused only if these match.

        The captioner is named by its content digest, so the same model under another path is
        the same captioner and a model replaced in place is another one; a hub id by its name.
        """
        return {"model": captioner_identity(self.model), "backend": self.backend, "prompt": self.prompt, "template": self.template,
                "max_new_tokens": self.max_new_tokens, "max_hint_chars": self.max_hint_chars}


def captioner_identity(model: str) -> str:
    path = Path(model).expanduser()
    return model_digest(path) if path.exists() else f"hub:{model}"


def local_model_path(model: str) -> str | None:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else None


def shard_file(shard: Shard) -> Path | None:
    """The input file of a tar/parquet shard (its content identifies the shard), else None."""
    path = storage.as_location(shard.source)  # a local Path or an object URL
    return path if storage.is_file(path) else None


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        """accelerate launch / torchrun set these; no process group is needed (ranks never talk)."""
        from t2i_recap.launch import check_cpu_launch

        check_cpu_launch("t2i_recap.captioner")  # the same refusal as the trainer's
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")))

    def mine(self, shards: list[Shard]) -> list[Shard]:
        return [s for i, s in enumerate(shards) if i % self.world == self.rank]


@dataclasses.dataclass
class Counts:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    length: int = 0
    repetition: int = 0
    seconds: float = 0.0

    def add(self, other: "Counts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ---------------------------------------------------------------- one shard


def prefetch(items: Iterator[Sample], depth: int) -> Iterator[Sample]:
    """Run `items` (reading + decoding) in a thread, `depth` items ahead; re-raise its errors here."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class ShardCaptioner:
    """Captions the samples of one shard in batches and fills their rows.

    With a backend that splits `prepare` (CPU: template, tokenising, image preprocessing) from
    `generate`, batch k+1 is prepared in a thread while batch k generates, so preprocessing does
    not starve the GPU (docs/references.md section 3).
    """

    def __init__(self, backend, cfg: CaptionRunConfig) -> None:
        self.backend, self.cfg = backend, cfg
        self.pipelined = callable(getattr(backend, "prepare", None)) and callable(getattr(backend, "generate", None))
        self.last_key: str | None = None  # the last sample read, named when the reader fails after it

    def run(self, shard: Shard, progress: tqdm | None = None,
            at_batch: Callable[[], None] | None = None) -> tuple[list[Row], Counts]:
        """`at_batch` is called before each batch is started; it raises to abandon the shard."""
        rows: list[Row] = []
        pending: list[tuple[Row, object, str]] = []
        seen: set[str] = set()
        self.last_key = None
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
            inflight: collections.deque = collections.deque()
            for sample in prefetch(shard.samples(), self.cfg.prefetch_batches * self.cfg.batch_size):
                rows.append(self._row(sample, seen, shard.name, pending))
                if len(pending) >= self.cfg.batch_size:
                    if at_batch is not None:
                        at_batch()
                    self._submit(pending, pool, inflight, progress)
                    pending = []
            if pending and at_batch is not None:
                at_batch()
            self._submit(pending, pool, inflight, progress)
            while inflight:
                self._finish(*inflight.popleft(), progress)
        counts = _count(rows)
        counts.seconds = time.perf_counter() - started
        if counts.failed and not counts.ok:
            first = next(r.error for r in rows if r.status == "failed")
            raise RuntimeError(f"shard {shard.name}: every sample failed in the captioner; first error: {first}")
        return rows, counts

    def _row(self, sample: Sample, seen: set[str], shard: str, pending: list) -> Row:
        self.last_key = sample.key
        row = Row(key=sample.key, org_caption=sample.org_caption, notes=list(sample.notes), url=sample.url,
                  sha256=sample.sha256)
        if sample.error is not None:
            row.status, row.error = "skipped", sample.error
        elif sample.key in seen:
            row.status, row.error = "skipped", f"duplicate key {sample.key!r} in shard {shard}"
        else:
            prompt, notes = build_prompt_with_notes(self.cfg.prompt, sample.org_caption, self.cfg.template,
                                                    self.cfg.max_hint_chars)
            row.notes.extend(notes)
            pending.append((row, sample.image, prompt))
        seen.add(sample.key)
        return row

    def _submit(self, batch: list, pool: ThreadPoolExecutor, inflight: collections.deque, progress) -> None:
        if not batch:
            return
        if not self.pipelined:
            self._caption(batch, progress)
            return
        inflight.append((batch, pool.submit(self.backend.prepare, [b[1] for b in batch], [b[2] for b in batch])))
        while len(inflight) > 1:  # keep exactly one batch being prepared ahead
            self._finish(*inflight.popleft(), progress)

    def _finish(self, batch: list, prepared: Future, progress) -> None:
        try:
            gens = self.backend.generate(prepared.result(), self.cfg.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - retried one by one below, where errors are recorded
            self._retry_alone(batch, exc, progress)
            return
        self._fill(batch, gens, progress)

    def _caption(self, batch: list[tuple[Row, object, str]], progress: tqdm | None) -> None:
        try:
            gens = self.backend.caption([b[1] for b in batch], [b[2] for b in batch], self.cfg.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - one bad image must not sink its batch: retry alone
            self._retry_alone(batch, exc, progress)
            return
        self._fill(batch, gens, progress)

    def _retry_alone(self, batch: list, exc: Exception, progress) -> None:
        if len(batch) == 1:
            row = batch[0][0]
            row.status, row.error = "failed", f"captioner error: {type(exc).__name__}: {exc}"
            log.warning("key %s: %s", row.key, row.error)
            if progress is not None:
                progress.update(1)
            return
        log.warning("batch of %d failed (%s: %s); retrying one at a time", len(batch), type(exc).__name__, exc)
        for item in batch:
            self._caption([item], progress)

    def _fill(self, batch: list, gens: list, progress) -> None:
        for (row, _, _), gen in zip(batch, gens, strict=True):
            row.re_caption, row.finish_reason, row.re_num_tokens = gen.text, gen.finish_reason, gen.num_tokens
            row.repetition = is_repetitive(gen.text, gen.finish_reason)
        if progress is not None:
            progress.update(len(batch))


def _count(rows: list[Row]) -> Counts:
    c = Counts()
    for r in rows:
        setattr(c, r.status, getattr(c, r.status) + 1)
        c.length += r.finish_reason == "length"
        c.repetition += bool(r.repetition)
    return c


# ---------------------------------------------------------------- the run


def shard_metadata(cfg: CaptionRunConfig, backend, shard: Shard, counts: Counts, dist: Dist,
                   source: dict | None = None) -> dict:
    from t2i_recap import __version__

    captioned = counts.ok + counts.failed
    return {
        "fingerprint": cfg.fingerprint(),
        "model": cfg.model,
        "model_path": local_model_path(cfg.model),
        "prompt": {"preset": cfg.prompt, "template": cfg.template,
                   "example": build_prompt_with_notes(cfg.prompt, "ALT-TEXT", cfg.template, cfg.max_hint_chars)[0]},
        "generation": {"decoding": "greedy", "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size},
        "backend": backend.describe(),
        # `input`: digest, size, mtime and sample count of the shard read; the trainer's join checks it.
        "shard": {"name": shard.name, "source": shard.source, "input": source},
        "counts": dataclasses.asdict(counts),
        "images_per_second": round(captioned / counts.seconds, 4) if counts.seconds > 0 else None,
        "engine": cfg.engine,
        "rank": dist.rank,
        "world_size": dist.world,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "t2i_recap_version": __version__,
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
    }


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def caption_run(cfg: CaptionRunConfig, dist: Dist | None = None, backend=None) -> dict:
    """Caption the unfinished shards (this rank's, or with engine ray all of them); returns a summary."""
    if cfg.engine == "ray":
        if dist is not None or backend is not None:
            raise ValueError("engine ray starts its own workers, each loading the model: pass neither dist nor backend")
        return _caption_run_ray(cfg)
    dist = dist or Dist.from_env()
    plan = plan_run(cfg, dist)
    out, todo = plan.out, plan.todo
    if dist.rank == 0:
        save_config(cfg, storage.join(out, "caption_config.yaml"))
    summary = new_summary(plan, dist)
    if todo and backend is None:
        # `accelerate launch --cpu` asks for the CPU even where a GPU exists.
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        backend = load_backend(cfg, "cpu" if cpu else None, dist.local_rank)
    worker = ShardCaptioner(backend, cfg)
    claims = run_claims(cfg, dist.world)
    summary.update(shards_done_elsewhere=0, shards_lost=[], interrupted=None, claim_owner=claims.owner.describe())
    with StopSignals() as stop:
        claimed = claims.each(todo, lambda s: s.name, lambda s: shard_done(cfg, s), stop.event)
        try:
            _caption_claimed(claimed, worker, cfg, backend, dist, summary, stop, claims.owner.describe())
        finally:
            claimed.close()  # releases the claim in hand when the loop ended early
        summary["interrupted"] = stop.signal_name
    claims.prune()
    summary["shards_done_elsewhere"] = len(claims.finished_elsewhere)
    summary["counts"] = dataclasses.asdict(summary["counts"])
    return summary


@dataclasses.dataclass
class RunPlan:
    """The shards of a run: all of them, those this process is given, and those of these not yet done."""

    out: Path | str
    shards: list[Shard]
    mine: list[Shard]
    todo: list[Shard]


def plan_run(cfg: CaptionRunConfig, dist: Dist) -> RunPlan:
    """Check the required settings, list the shards and find the unfinished ones of this rank."""
    for name in ("input", "out", "model"):
        if not getattr(cfg, name):
            raise ConfigError(f"{name}: required (--{name})")
    out = storage.as_location(cfg.out)  # a local Path or an object-store URL
    shards = open_shards(cfg.input, cfg.reader)
    mine = dist.mine(shards)
    todo = [s for s in mine if not shard_done(cfg, s)]
    if dist.world > 1:
        log.info("%d shards in %s; rank %d of %d owns %d, %d already done", len(shards), cfg.input, dist.rank,
                 dist.world, len(mine), len(mine) - len(todo))
    else:
        log.info("%d shards in %s, %d already done", len(shards), cfg.input, len(shards) - len(todo))
    storage.makedirs(out)
    return RunPlan(out, shards, mine, todo)


def shard_done(cfg: CaptionRunConfig, shard: Shard) -> bool:
    """Is the shard's sidecar finished, with these settings, from this input? (`writer.stale_reason`)"""
    path = sidecar_path(storage.as_location(cfg.out), shard.name)
    return stale_reason(path, cfg.fingerprint(), model_path=local_model_path(cfg.model),
                        shard_file=shard_file(shard)) is None


def new_summary(plan: RunPlan, dist: Dist) -> dict:
    """The summary fields both engines report, before any shard is captioned."""
    todo = {s.name for s in plan.todo}
    return {"engine": "accelerate", "rank": dist.rank, "world_size": dist.world, "shards_total": len(plan.shards),
            "shards_mine": len(plan.mine), "shards_skipped_done": len(plan.mine) - len(todo), "shards_done": 0,
            "shards_failed": [], "counts": Counts(),
            "shards_empty": [s.name for s in plan.mine if s.name not in todo
                             and _was_empty(sidecar_path(plan.out, s.name))]}


def load_backend(cfg: CaptionRunConfig, device: str | None = None, local_rank: int = 0):
    """The captioner named by `cfg`, on `cfg.device`, else `device`, else cuda:LOCAL_RANK or the CPU."""
    from .backend import default_device, make_backend

    device = cfg.device or device or str(default_device(local_rank))
    return make_backend(cfg.backend, cfg.model, device=device, dtype=cfg.dtype,
                        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                        kv_cache=cfg.kv_cache)


def run_claims(cfg: CaptionRunConfig, world: int) -> Claims:
    """This process's claims on the run's output folder, `world` being how many processes write to it."""
    return Claims(storage.claims_root(storage.as_location(cfg.out), cfg.claims_dir, world), cfg.claims)


@dataclasses.dataclass
class ShardOutcome:
    """How one claimed shard ended: `done` (sidecar written), `failed` (no sidecar; `error` says why),
    `lost` (another process took the claim over) or `stopped` (a stop signal, at a batch boundary)."""

    shard: str
    source: str
    status: Literal["done", "failed", "lost", "stopped"]
    counts: Counts | None = None
    samples: int = 0
    error: str | None = None
    after_key: str | None = None


def caption_shard(shard: Shard, claim, worker: ShardCaptioner, cfg: CaptionRunConfig, backend, dist: Dist,
                  owner: dict, check: Callable[[], None], progress: tqdm | None = None) -> ShardOutcome:
    """Caption one shard whose claim this process holds and write its sidecar; both engines call this.

    `check` is called before each batch and raises `Stopped` to abandon the shard. Errors of the
    shard (unreadable, changed while read, every sample failed) become a `failed` outcome; a full
    disk is raised, since every later shard would fail the same way.
    """
    path = sidecar_path(storage.as_location(cfg.out), shard.name)
    remove_stale_temps(path)  # only the claim holder may: another process could be writing it otherwise
    try:
        source = _describe(shard)
        rows, counts = worker.run(shard, progress, at_batch=lambda: check() or claim.check())
        _check_unchanged(shard, source)
        if source is not None:
            source["samples"] = len(rows)
        claim.check()  # a process that stalled past the stale timeout must not overwrite the taker's work
        write_sidecar(path, rows, {**shard_metadata(cfg, backend, shard, counts, dist, source), "claim": owner})
    except Stopped as exc:
        log.warning("%s: stopped by %s before it was finished; no sidecar written", shard.name, exc)
        return ShardOutcome(shard.name, shard.source, "stopped", error=str(exc))
    except ClaimLost as exc:
        return ShardOutcome(shard.name, shard.source, "lost", error=str(exc))
    except DiskFullError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable shard must not stop the others
        where = f" after sample {worker.last_key!r}" if worker.last_key is not None else ""
        log.error("shard %s (%s) failed%s, no sidecar written: %s: %s", shard.name, shard.source, where,
                  type(exc).__name__, exc)
        return ShardOutcome(shard.name, shard.source, "failed", error=f"{type(exc).__name__}: {exc}",
                            after_key=worker.last_key)
    return ShardOutcome(shard.name, shard.source, "done", counts=counts, samples=len(rows))


def record_outcome(summary: dict, outcome: ShardOutcome) -> None:
    """Add one shard's outcome to a run summary (`stopped` adds nothing: the shard is simply not done)."""
    if outcome.status == "lost":
        summary["shards_lost"].append({"shard": outcome.shard, "error": outcome.error})
    elif outcome.status == "failed":
        summary["shards_failed"].append({"shard": outcome.shard, "after_key": outcome.after_key,
                                         "error": outcome.error})
    elif outcome.status == "done":
        counts = outcome.counts
        summary["counts"].add(counts)
        summary["shards_done"] += 1
        if counts.ok == 0 and counts.failed == 0:
            log.error("shard %s (%s): every one of its %d samples was skipped; nothing in it was captioned",
                      outcome.shard, outcome.source, outcome.samples)
            summary["shards_empty"].append(outcome.shard)
        log.info("%s: %d ok, %d skipped, %d failed, %d hit the cap, %d repetitive (%.1f s)", outcome.shard,
                 counts.ok, counts.skipped, counts.failed, counts.length, counts.repetition, counts.seconds)


def _caption_claimed(claimed, worker: ShardCaptioner, cfg: CaptionRunConfig, backend, dist: Dist, summary: dict,
                     stop: "StopSignals", owner: dict) -> None:
    """Caption each shard this process holds the claim on; a stop signal ends the loop at a batch boundary."""
    for shard, claim in claimed:
        bar = tqdm(desc=f"{shard.name}", unit="img", disable=dist.rank != 0 or not sys.stderr.isatty())
        try:
            outcome = caption_shard(shard, claim, worker, cfg, backend, dist, owner, stop.check, bar)
        finally:
            bar.close()
        record_outcome(summary, outcome)
        if outcome.status == "stopped":
            return


# ---------------------------------------------------------------- engine ray


def _caption_run_ray(cfg: CaptionRunConfig) -> dict:
    """Caption every unfinished shard on Ray workers (`ray_engine.Driver`), each a `ShardWorker`."""
    ray = require("ray", "ray", "caption run --engine ray")
    plan = plan_run(cfg, Dist())
    save_config(cfg, storage.join(plan.out, "caption_config.yaml"))
    summary = new_summary(plan, Dist())
    summary.update(engine="ray", world_size=0, shards_done_elsewhere=0, shards_lost=[], interrupted=None,
                   retries=[], workers=[])
    settings = RaySettings(cfg.workers, cfg.ray_address, cfg.ray_max_retries, cfg.ray_cpus_per_worker,
                           cfg.ray_gpus_per_worker, cfg.claims.poll_s)
    if plan.todo:
        if (cfg.workers or 2) > 1:  # several workers on an object-store --out need claims_dir: refused before Ray starts
            storage.claims_root(plan.out, cfg.claims_dir, 2)
        connected_here = connect(ray, settings)
        try:
            with StopSignals() as stop:  # after ray.init, which installs its own SIGTERM handler
                Driver(ray, settings, ShardWorker, (cfg,), [s.name for s in plan.todo], summary,
                       lambda outcome: record_outcome(summary, outcome), stop).run()
                summary["interrupted"] = stop.signal_name
        finally:
            if connected_here:
                ray.shutdown()
    if not storage.is_url(plan.out) or cfg.claims_dir:  # a lone worker's private claims folder is its own
        run_claims(cfg, max(1, summary["world_size"])).prune()
    summary["counts"] = dataclasses.asdict(summary["counts"])
    return summary


class ShardWorker:
    """One model replica in its own process (a Ray actor): `caption(name)` claims one shard and captions
    it with `caption_shard`, as the accelerate path does. `stop` is called from another thread."""

    def __init__(self, cfg: CaptionRunConfig, index: int, world: int, device: str | None) -> None:
        setup_logging(logging.WARNING)  # the driver logs each shard's counts; workers only what went wrong
        if (cfg.device or device) == "cpu":
            import torch

            torch.set_num_threads(max(1, int(cfg.ray_cpus_per_worker)))
        self.cfg, self.dist = cfg, Dist(rank=index, world=world)
        self.shards = {s.name: s for s in open_shards(cfg.input, cfg.reader)}
        self.backend = load_backend(cfg, device)
        self.captioner = ShardCaptioner(self.backend, cfg)
        self.claims = run_claims(cfg, world)
        self.owner = self.claims.owner.describe()
        self._stop = threading.Event()
        self._stop_reason = ""

    def describe(self) -> dict:
        return {"index": self.dist.rank, "host": self.owner["host"], "pid": self.owner["pid"],
                "claim_token": self.owner["token"]}

    def caption(self, name: str) -> ShardReply:
        shard = self.shards.get(name)
        if shard is None:
            outcome = ShardOutcome(name, "?", "failed", error=f"shard {name!r} is not in this worker's listing of "
                                   f"{self.cfg.input} (did the input change after the run started?)")
            return ShardReply("finished", name, self.describe(), outcome)
        claim = self.claims.try_acquire(name)
        if claim is None:
            return ShardReply("busy", name, self.describe())
        with claim:
            if shard_done(self.cfg, shard):  # asked again once claimed: its last owner may have just finished
                return ShardReply("done_elsewhere", name, self.describe())
            outcome = caption_shard(shard, claim, self.captioner, self.cfg, self.backend, self.dist, self.owner,
                                    self._check)
        if outcome.status == "stopped":
            return ShardReply("stopped", name, self.describe(), outcome)
        images = outcome.counts.ok + outcome.counts.failed if outcome.counts is not None else 0
        return ShardReply("finished", name, self.describe(), outcome, images)

    def stop(self, reason: str) -> None:
        """Abandon the shard in hand at its next batch boundary."""
        self._stop_reason = reason
        self._stop.set()

    def _check(self) -> None:
        if self._stop.is_set():
            raise Stopped(self._stop_reason)


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; the current shard is abandoned at a batch boundary."""


class StopSignals:
    """Turn SIGTERM/SIGINT into a flag checked at batch boundaries (a preempted job gets SIGTERM, then
    SIGKILL after a grace period: finishing the batch in hand and writing nothing half-done fits it).
    A second SIGINT stops at once. Handlers are installed only in the main thread, where Python allows."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def check(self) -> None:
        if self.event.is_set():
            raise Stopped(self.signal_name)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: stopping at the next batch boundary", signal.Signals(signum).name)
        self.signum = signum
        self.event.set()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- CLI


def _describe(shard: Shard) -> dict | None:
    path = shard_file(shard)
    return describe(path) if path is not None else None


def _check_unchanged(shard: Shard, before: dict | None) -> None:
    """Refuse to mark a shard done when its file changed while it was read (a download still being written)."""
    path = shard_file(shard)
    if before is not None and path is not None and stamp(path) != {k: before[k] for k in ("size", "mtime_ns")}:
        raise RuntimeError(f"shard {path} changed while it was being captioned (still being written?); "
                           "rerun once it is complete")


def _was_empty(path: Path) -> bool:
    counts = (read_info(path) or {}).get("counts") or {}
    return counts.get("ok", 0) == 0 and counts.get("failed", 0) == 0


FLAGS = {  # public flag -> CaptionRunConfig field; every other field through --config / --set
    "--input": "input", "--input-format": "reader.format", "--out": "out", "--model": "model", "--prompt": "prompt",
    "--template": "template", "--batch-size": "batch_size", "--max-new-tokens": "max_new_tokens", "--dtype": "dtype",
    "--device": "device", "--trust-remote-code": "trust_remote_code", "--allow-empty-shards": "allow_empty_shards",
    "--engine": "engine", "--workers": "workers", "--ray-address": "ray_address",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap caption run", description=__doc__.split("\n")[0])
    cli_config.add_config_arguments(p, CaptionRunConfig, FLAGS)
    return p


def config_from_args(args: argparse.Namespace) -> CaptionRunConfig:
    """Defaults < --config < --set < flags; `--template` alone means `prompt: custom` (under --set)."""
    if cli_config.given(args, "--template") is not None and cli_config.given(args, "--prompt") is None:
        args.set = ["prompt=custom", *args.set]
    return cli_config.config_from_args(CaptionRunConfig, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
        summary = caption_run(cfg)
    except (ConfigError, ValueError, FileNotFoundError, MissingExtraError, WorkerStartError) as exc:
        print(f"t2i-recap caption run: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["interrupted"]:
        return 128 + signal.Signals[summary["interrupted"]].value  # the shell's code for death by that signal
    if summary["shards_empty"] and not cfg.allow_empty_shards:
        print(f"t2i-recap caption run: error: every sample was skipped in shard(s) {summary['shards_empty']} "
              "(pass --allow-empty-shards to accept that)", file=sys.stderr)
        return 1
    return 1 if summary["shards_failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
