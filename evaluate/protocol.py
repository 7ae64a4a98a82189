"""The paper's evaluation protocol: every prompt in its raw form and in a recaptioned form.

Li et al. (2024, section 5) score their DiTs on COCO prompts twice: the raw COCO captions, and
the COCO images recaptioned by their captioner. The recaption describes the *image the prompt
was written for*, so here it comes from one of these sources (`--recaption`):

* `column`: the suite file's `recaption` / `re_caption` column (e.g. written by
  `t2i-recap caption run` on the reference images).
* `PATH` (a captioner model folder): caption each prompt's reference image with
  `t2i_recap.captioner.backend.TransformersBackend` and the paper's prompt. The reference image
  is the suite's gold scene rendered (shapes suite: the exact analogue of the COCO image) or the
  file in the `image` column (resolved under `--images-root`, default the suite file's folder).
* `gold`: the shapes world's gold dense caption of the gold scene: a perfect captioner, useful
  as a ceiling and in tests; reports label it as such.
* `none`: raw prompts only. `auto` (default) is `column` when the suite has recaptions, else `none`.

Both forms of a prompt use the same seeds, and are scored against the same constraints (the
raw prompt's target), so the two columns of the report differ only in the prompt text.
Recaptions are cached in the run folder (`recaptions.jsonl`), so a rerun does not recaption.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from PIL import Image

from t2i_recap.io import atomic_write_text, safe_join
from t2i_recap.logging_utils import get_logger
from t2i_recap.shapes.captions import gold_caption
from t2i_recap.shapes.render import render

from .suites import Suite

log = get_logger(__name__)
SOURCES = ("auto", "none", "column", "gold")


@dataclasses.dataclass
class Variant:
    """One form of the suite's prompts: `prompts[i]` is None where record i has no such form."""

    name: str
    prompts: list[str | None]
    source: str
    skipped: list[dict] = dataclasses.field(default_factory=list)


def _resolve_source(source: str, suite: Suite) -> str:
    if source == "auto":
        return "column" if any(r.recaption for r in suite.records) else "none"
    return source


def reference_image(record, resolution: int, images_root: Path | None) -> Image.Image:
    """The image a prompt was written for: its gold scene rendered, or its `image` file."""
    if record.scene:
        return render(record.gold_scene(), resolution)
    if record.image and images_root is not None:
        path = safe_join(images_root, record.image)  # a suite row must not read outside its folder
        with Image.open(path) as img:
            return img.convert("RGB")
    raise ValueError(f"prompt {record.id!r} has neither a gold scene nor an image to recaption")


def _caption_with_model(model: str, suite: Suite, resolution: int, images_root: Path | None,
                        max_new_tokens: int, batch_size: int) -> tuple[list[str | None], list[dict], dict]:
    from t2i_recap.captioner.backend import TransformersBackend
    from t2i_recap.captioner.prompts import build_prompt

    backend = TransformersBackend(model)
    out: list[str | None] = [None] * len(suite.records)
    skipped, finish = [], {"stop": 0, "length": 0}
    prompt = build_prompt("recap", None)
    for start in range(0, len(suite.records), batch_size):
        batch, images = [], []
        for r in suite.records[start:start + batch_size]:
            try:
                images.append(reference_image(r, resolution, images_root))
                batch.append(r)
            except (ValueError, OSError) as exc:
                skipped.append({"id": r.id, "reason": str(exc)})
        if not batch:
            continue
        for r, gen in zip(batch, backend.caption(images, [prompt] * len(batch), max_new_tokens=max_new_tokens)):
            out[r.index] = gen.text.strip() or None
            finish[gen.finish_reason] = finish.get(gen.finish_reason, 0) + 1
    from .weights import folder_sha256

    meta = {"model": str(model), "sha256": folder_sha256(model), "backend": backend.describe(),
            "prompt": prompt, "max_new_tokens": max_new_tokens,
            "reference_resolution": resolution, "finish_reasons": finish}
    return out, skipped, meta


def recaptions(suite: Suite, source: str, *, resolution: int = 32, images_root: Path | None = None,
               max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0) -> tuple[list[str | None], dict]:
    """The recaptioned form of every prompt (None where unavailable) and its provenance."""
    source = _resolve_source(source, suite)
    skipped: list[dict] = []
    meta: dict = {"source": source}
    if source == "none":
        texts: list[str | None] = [None] * len(suite.records)
    elif source == "column":
        texts = [r.recaption for r in suite.records]
    elif source == "gold":
        rng = random.Random(seed)
        texts = [gold_caption(r.gold_scene(), rng) if r.scene else None for r in suite.records]
        meta["note"] = "gold captions of the target scenes: a perfect captioner, not the paper's protocol"
    else:
        texts, skipped, model_meta = _caption_with_model(source, suite, resolution, images_root,
                                                         max_new_tokens, batch_size)
        meta.update(model_meta, source="captioner")
    for r, t in zip(suite.records, texts):
        if source != "none" and not t and not any(s["id"] == r.id for s in skipped):
            skipped.append({"id": r.id, "reason": f"no recaption from source {source!r}"})
    meta["skipped"] = skipped
    return texts, meta


def build_variants(suite: Suite, recaption_texts: list[str | None], meta: dict) -> list[Variant]:
    variants = [Variant("raw", [r.prompt for r in suite.records], "suite")]
    if any(recaption_texts):
        variants.append(Variant("recap", list(recaption_texts), meta["source"], meta.get("skipped", [])))
    return variants


def cached_recaptions(out_dir: Path, suite: Suite, source: str, **kwargs) -> tuple[list[str | None], dict]:
    """`recaptions`, cached in OUT/recaptions.jsonl and reused when source and suite match."""
    path = out_dir / "recaptions.jsonl"
    key = {"source": source, "suite_hash": suite.hash()}
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        if head.get("key") == key:
            log.info("reusing recaptions from %s", path)
            return [json.loads(line)["recaption"] for line in lines[1:]], head["meta"]
    texts, meta = recaptions(suite, source, **kwargs)
    rows = [json.dumps({"key": key, "meta": meta})]
    rows += [json.dumps({"id": r.id, "recaption": t}) for r, t in zip(suite.records, texts)]
    atomic_write_text(path, "\n".join(rows) + "\n")
    return texts, meta
