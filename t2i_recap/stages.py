"""Resumable pipeline stages: each stage's completion is a JSON marker keyed by a fingerprint.

A rerun skips every stage whose marker matches its fingerprint (its settings plus the
fingerprints of the stages it depends on), so Ctrl-C and rerun resumes at the first unfinished
stage; the commands inside a stage resume too (finished shards, `--resume latest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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

    def run_all(self, stages: list[Stage]) -> dict[str, dict]:
        bar = tqdm(total=round(sum(s.expected_seconds for s in stages)), desc="pipeline", unit="s-est",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} est. s [{elapsed}<{remaining}]")
        for stage in stages:
            fp = fingerprint(stage.settings, [self.fingerprints[d] for d in stage.depends])
            self.fingerprints[stage.name] = fp
            previous = self.done(stage, fp)
            if previous is not None:
                log.info("stage %s: done before (%.0f s), skipped", stage.name, previous["seconds"])
                self.summaries[stage.name] = previous["summary"]
            else:
                bar.set_postfix_str(stage.name)
                log.info("stage %s: running (about %.0f s expected)", stage.name, stage.expected_seconds)
                start = time.time()
                summary = stage.run() or {}
                seconds = time.time() - start
                atomic_write_text(self._marker(stage.name), json.dumps(
                    {"stage": stage.name, "fingerprint": fp, "seconds": seconds, "summary": summary}, indent=2))
                self.summaries[stage.name] = summary
                log.info("stage %s: finished in %.0f s", stage.name, seconds)
            bar.update(round(stage.expected_seconds))
        bar.close()
        return self.summaries
