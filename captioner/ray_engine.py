"""`caption run --engine ray`: named shards handed to Ray workers as they free up, dead workers replaced.

    t2i-recap caption run --engine ray --workers 4 --input 'shards/{00000..00099}.tar' --out recaps --model M
    t2i-recap caption run --engine ray --ray-address auto ...      # join the cluster of `ray start`

This module is the Ray side only: connecting to (or starting) Ray, and the driver loop. What a
worker does with a shard is the caller's: `run.ShardWorker`, a class whose instances load the
captioner once and caption one named shard per `caption(name)` call with the same per-shard
function and claims as the accelerate path. Each worker is a Ray actor made from that class.

The driver hands the next shard to whichever worker is free (not shard i to worker i % N), so a
slow shard or worker holds up nobody; a worker is free once its `describe()` answers, i.e. once its
model is loaded. A worker that dies (SIGKILL, out of memory, its node lost) makes Ray fail its
task: the driver records why in the summary's `retries`, starts a replacement and hands the shard
out again, at most `ray_max_retries` times; a shard past that is reported in `shards_failed` with
every reason. A worker that cannot load the captioner at all stops the run (`WorkerStartError`).
SIGTERM/SIGINT to the driver ask every busy worker to stop at its next batch boundary.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Literal

from tqdm import tqdm

from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)

# Set before Ray starts: no usage-statistics report (nothing outside is reached) and no prompt for it.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0"}


class WorkerStartError(RuntimeError):
    """A worker could not start (its captioner failed to load): the run stops with that reason."""


@dataclasses.dataclass
class ShardReply:
    """What a worker did with the shard it was handed.

    `finished`: captioned or failed by itself (`outcome` says which, for the caller's `record`);
    `stopped`: abandoned at a batch boundary on request; `busy`: a live process of another run holds
    its claim (the driver looks again later); `done_elsewhere`: finished by another run meanwhile."""

    status: Literal["finished", "stopped", "busy", "done_elsewhere"]
    shard: str
    worker: dict
    outcome: Any = None
    images: int = 0
    """Images captioned (ok or failed), for the driver's images/s."""


@dataclasses.dataclass
class RaySettings:
    """The Ray side of a run (fields of `run.CaptionRunConfig`)."""

    workers: int | None
    address: str | None
    max_retries: int
    cpus_per_worker: float
    gpus_per_worker: float | None
    poll_s: float
    """Seconds before a shard another run's live process holds is handed out again."""


def connect(ray, settings: RaySettings) -> bool:
    """Join `settings.address` (or RAY_ADDRESS), or start a local instance; True when this call started
    or joined Ray (so the caller shuts the connection down), False when the process was connected already."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():  # a program that calls caption_run has connected already
        log.info("using the Ray instance this process is connected to")
        return False
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    cpus = max(os.cpu_count() or 1, math.ceil((settings.workers or 1) * settings.cpus_per_worker))
    log.info("starting a local Ray instance (%d CPUs)", cpus)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


class Driver:
    """Hands shards to free workers, replaces dead ones, and reports each finished shard to `record`.

    `worker_cls(*worker_args, index, world, device)` builds a worker in its Ray process; it has
    `describe() -> dict` (with a unique `claim_token`), `caption(name) -> ShardReply` and
    `stop(reason)`, which a second thread calls while `caption` runs (the actor has 2 threads).
    `stop` is the driver's `run.StopSignals`: once its `event` is set no shard is handed out and
    every busy worker is asked to stop.
    """

    def __init__(self, ray, settings: RaySettings, worker_cls: type, worker_args: tuple, todo: list[str],
                 summary: dict, record: Callable[[Any], None], stop) -> None:
        self.ray, self.settings, self.summary, self.record, self.stop = ray, settings, summary, record, stop
        self.worker_args = worker_args
        self.total = len(todo)
        self.pending = collections.deque(todo)
        self.later: list[tuple[float, str]] = []  # held by a live process of another run: look again then
        self.deaths: dict[str, list[str]] = collections.defaultdict(list)
        self.inflight: dict = {}  # task ref -> (worker slot, shard name)
        self.starting: dict = {}  # readiness probe ref -> worker slot
        self.idle: collections.deque[int] = collections.deque()  # slots of started workers with nothing to do
        self.finished = self.images = self.start_deaths = 0
        gpus = float(ray.cluster_resources().get("GPU", 0))
        self.gpus = settings.gpus_per_worker if settings.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        wanted = settings.workers or (max(1, int(gpus // self.gpus)) if self.gpus else 1)
        self.n = min(wanted, self.total)
        self.device = None if self.gpus else "cpu"  # on a GPU, Ray's CUDA_VISIBLE_DEVICES makes it cuda:0
        self.actor_cls = ray.remote(worker_cls).options(
            num_cpus=settings.cpus_per_worker, num_gpus=self.gpus, max_concurrency=2, max_restarts=0,
            max_task_retries=0)
        self.actors: list = [None] * self.n
        self.seen_workers: dict[str, dict] = {}
        summary.update(world_size=self.n, shards_done_elsewhere=0, retries=[], workers=[])

    def run(self) -> None:
        log.info("captioning %d shards on %d Ray workers (%g CPU, %g GPU each)", self.total, self.n,
                 self.settings.cpus_per_worker, self.gpus)
        self.started = time.monotonic()
        for slot in range(self.n):
            self._start(slot)
        self.bar = tqdm(total=self.total, desc="shards", unit="shard", disable=not sys.stderr.isatty())
        try:
            self._loop()
        finally:
            self.bar.close()
            for actor in self.actors:
                if actor is not None:
                    self.ray.kill(actor)
            self.summary["workers"] = sorted(self.seen_workers.values(), key=lambda w: (w["index"], w["pid"]))

    def _start(self, slot: int) -> None:
        """Start a worker in `slot`; it takes shards once its model is loaded (its `describe` answered)."""
        self.actors[slot] = self.actor_cls.remote(*self.worker_args, slot, self.n, self.device)
        self.starting[self.actors[slot].describe.remote()] = slot

    def _work_left(self) -> bool:
        return bool(self.pending or self.later or self.inflight)

    def _loop(self) -> None:
        stopping = False
        while self._work_left():
            if self.stop.event.is_set() and not stopping:
                stopping = True
                self.pending.clear()
                self.later.clear()
                for slot, _ in self.inflight.values():
                    self.actors[slot].stop.remote(f"{self.stop.signal_name or 'a stop signal'} to the driver")
            now = time.monotonic()
            self.pending.extend(name for due, name in self.later if due <= now)
            self.later = [(due, name) for due, name in self.later if due > now]
            while self.idle and self.pending:
                slot, name = self.idle.popleft(), self.pending.popleft()
                self.inflight[self.actors[slot].caption.remote(name)] = (slot, name)
            if not self.inflight and not self.starting:
                if self.later:
                    self.stop.event.wait(max(0.0, min(due for due, _ in self.later) - now))
                continue
            ready, _ = self.ray.wait([*self.inflight, *self.starting], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in self.starting:
                    self._ready(ref, stopping)
                else:
                    self._collect(ref, stopping)

    def _ready(self, ref, stopping: bool) -> None:
        slot = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                raise WorkerStartError(f"a Ray worker could not start: {_short(exc, 2000)}") from None
            self.start_deaths += 1
            if self.start_deaths > self.n * (self.settings.max_retries + 1):
                raise WorkerStartError(f"Ray workers died {self.start_deaths} times while starting; last: "
                                       f"{_short(exc)}") from None
            log.warning("worker %d died while starting: %s", slot, _short(exc))
            self.actors[slot] = None
            if self._work_left() and not stopping:
                self._start(slot)
            return
        self.seen_workers[info["claim_token"]] = info
        self.idle.append(slot)

    def _collect(self, ref, stopping: bool) -> None:
        slot, name = self.inflight.pop(ref)
        try:
            reply: ShardReply = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._worker_died(slot, name, _short(exc), stopping)
            return
        self.idle.append(slot)
        if reply.status == "busy":
            self.later.append((time.monotonic() + self.settings.poll_s, name))
        elif reply.status == "done_elsewhere":
            self.summary["shards_done_elsewhere"] += 1
            self._finished_one()
        elif reply.status == "finished":
            self.record(reply.outcome)
            self.images += reply.images
            self._finished_one()

    def _worker_died(self, slot: int, name: str, reason: str, stopping: bool) -> None:
        self.actors[slot] = None
        self.deaths[name].append(reason)
        attempt, most = len(self.deaths[name]), self.settings.max_retries
        if stopping:
            log.warning("worker %d died while stopping, with shard %s unfinished: %s", slot, name, reason)
            return
        if attempt > most:
            log.error("shard %s: its worker died %d times (ray_max_retries=%d); giving up on it. Last: %s", name,
                      attempt, most, reason)
            self.summary["shards_failed"].append({
                "shard": name, "after_key": None,
                "error": f"its worker died {attempt} times (ray_max_retries={most}); last: {reason}",
                "worker_deaths": list(self.deaths[name])})
            self._finished_one()
        else:
            log.warning("worker %d died with shard %s (attempt %d of %d); starting a new worker and handing the "
                        "shard out again: %s", slot, name, attempt, most + 1, reason)
            self.summary["retries"].append({"shard": name, "worker": slot, "attempt": attempt, "reason": reason})
            self.pending.appendleft(name)
        if self._work_left():
            self._start(slot)

    def _finished_one(self) -> None:
        self.finished += 1
        elapsed = time.monotonic() - self.started
        rate = self.images / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval(elapsed / self.finished * (self.total - self.finished))
        self.bar.update(1)
        self.bar.set_postfix_str(f"{rate:.2f} img/s")
        log.info("%d/%d shards finished, %.2f images/s, ETA %s", self.finished, self.total, rate, eta)


def _short(exc: BaseException, limit: int = 600) -> str:
    """One line of at most `limit` characters: Ray's error texts run over many lines."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
