"""Resumable pipeline stages: each stage's completion is a JSON marker keyed by a fingerprint.

A rerun skips every stage whose marker matches its fingerprint (its settings plus the
fingerprints of the stages it depends on), so Ctrl-C and rerun resumes at the first unfinished
stage; the commands inside a stage resume too (finished shards, `--resume latest`).

Stages marked `isolated` do their work in a child process; with `workers > 1` such stages run
side by side once their dependencies are done (e.g. one DiT per core). Other stages run alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)


@dataclasses.dataclass
class Stage:
    """One step of a pipeline. `run()` does the work and returns a JSON-able summary."""

    name: str
    run: Callable[[], dict]
    settings: dict
    expected_seconds: float
    depends: tuple[str, ...] = ()
    isolated: bool = False
    """The work runs in a child process, so it may overlap other isolated stages."""


def fingerprint(settings: Any, upstream: list[str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRunner:
    """Runs stages in order with an overall progress bar whose ETA weighs stages by expected time."""

    def __init__(self, out_dir: str | Path):
        self.marker_dir = Path(out_dir) / "stages"
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprints: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}

    def _marker(self, name: str) -> Path:
        return self.marker_dir / f"{name}.json"

    def done(self, stage: Stage, fp: str) -> dict | None:
        path = self._marker(stage.name)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return data if data.get("fingerprint") == fp else None

    def run_all(self, stages: list[Stage], workers: int = 1) -> dict[str, dict]:
        """Run `stages` (listed after their dependencies); up to `workers` isolated stages at once."""
        names = {s.name for s in stages}
        for i, stage in enumerate(stages):
            earlier = {s.name for s in stages[:i]}
            unknown = [d for d in stage.depends if d not in names]
            if unknown or not set(stage.depends) <= earlier:
                raise ValueError(f"stage {stage.name!r} depends on {unknown or stage.depends}: "
                                 "stages must be listed after what they depend on")
            self.fingerprints[stage.name] = fingerprint(stage.settings, [self.fingerprints[d] for d in stage.depends])
        bar = tqdm(total=round(sum(s.expected_seconds for s in stages)), desc="pipeline", unit="s-est",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} est. s [{elapsed}<{remaining}]")
        lock = threading.Lock()
        pending, finished, running = list(stages), set(), {}
        with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            while pending or running:
                ready = [s for s in pending if set(s.depends) <= finished]
                stage = ready[0] if ready else None
                can_start = stage is not None and (
                    (stage.isolated and len(running) < max(1, workers)
                     and all(r.isolated for r in running.values())) or not running)
                if can_start:
                    pending.remove(stage)
                    running[pool.submit(self._run_one, stage, bar, lock)] = stage
                    continue
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    stage = running.pop(future)
                    future.result()  # a failed stage stops the pipeline once the others in flight end
                    finished.add(stage.name)
        bar.close()
        return self.summaries

    def _run_one(self, stage: Stage, bar, lock: threading.Lock) -> None:
        fp = self.fingerprints[stage.name]
        previous = self.done(stage, fp)
        if previous is not None:
            log.info("stage %s: done before (%.0f s), skipped", stage.name, previous["seconds"])
            summary = previous["summary"]
        else:
            with lock:
                bar.set_postfix_str(stage.name)
            log.info("stage %s: running (about %.0f s expected)", stage.name, stage.expected_seconds)
            start = time.time()
            summary = stage.run() or {}
            seconds = time.time() - start
            atomic_write_text(self._marker(stage.name), json.dumps(
                {"stage": stage.name, "fingerprint": fp, "seconds": seconds, "summary": summary}, indent=2))
            log.info("stage %s: finished in %.0f s", stage.name, seconds)
        with lock:
            self.summaries[stage.name] = summary
            bar.update(round(stage.expected_seconds))
