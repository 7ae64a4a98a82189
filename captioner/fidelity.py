"""Caption fidelity on the shapes world: parse each caption back into a scene graph and compare.

`t2i-recap caption fidelity --shards DIR (--model DIR | --sidecars DIR | --caption-field F) --out DIR`

The shapes world knows every image's true scene (the shard json's "scene"), and
`t2i_recap.shapes.parser.parse_caption` reads a caption into objects. A caption is an exact
match when its parse is clean (no unknown words, contradictions or half-described objects) and
its scene equals the truth. Otherwise the parsed objects are matched to the true ones (a pair
must agree on at least two of colour, shape, size and position) and the errors counted:
hallucinated objects (said, not there), missed objects (there, not said), wrong attributes
(colour / shape / size / position of a matched object) and relation sentences that contradict
the positions. Everything is also broken down by the true number of objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.io import atomic_write_text, expand_shards
from t2i_recap.markdown import md_table, md_text
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.shapes.parser import parse_caption
from t2i_recap.shapes.world import Obj, Scene
from t2i_recap.shards import iter_tar_samples

log = get_logger(__name__)

ATTRIBUTES = ("color", "shape", "size", "position")
MAX_WRONG_TO_MATCH = 2  # a pair that differs in 3 or 4 attributes is a miss plus a hallucination
ERROR_KINDS = ("hallucinated", "missed", *(f"wrong_{a}" for a in ATTRIBUTES), "false_relations")


@dataclasses.dataclass
class SampleFidelity:
    """One caption against its true scene."""

    key: str
    num_objects: int
    exact: bool
    scene_match: bool
    errors: dict[str, int]
    problems: list[str]
    caption: str


def _wrong(a: Obj, b: Obj) -> list[str]:
    values = lambda o: {"color": o.color, "shape": o.shape, "size": o.size, "position": o.cell}  # noqa: E731
    va, vb = values(a), values(b)
    return [k for k in ATTRIBUTES if va[k] != vb[k]]


def match_objects(truth: list[Obj], said: list[Obj]) -> tuple[list[tuple[Obj, Obj]], list[Obj], list[Obj]]:
    """Pair said objects with true ones: most pairs first, then fewest wrong attributes.

    Returns (pairs (true, said), missed true objects, hallucinated said objects). Exhaustive over
    assignments: scenes hold at most a handful of objects, so this stays small, and it needs no
    solver dependency.
    """
    best, best_cost = [], None
    slots = list(range(len(said))) + [None] * len(truth)
    for choice in itertools.permutations(slots, len(truth)) if len(said) <= 8 else [_greedy(truth, said)]:
        pairs = [(t, said[j]) for t, j in zip(truth, choice) if j is not None]
        if any(len(_wrong(t, s)) > MAX_WRONG_TO_MATCH for t, s in pairs):
            continue
        cost = (-len(pairs), sum(len(_wrong(t, s)) for t, s in pairs))
        if best_cost is None or cost < best_cost:
            best, best_cost = pairs, cost
    used_t, used_s = {id(t) for t, _ in best}, {id(s) for _, s in best}
    return best, [t for t in truth if id(t) not in used_t], [s for s in said if id(s) not in used_s]


def _greedy(truth: list[Obj], said: list[Obj]) -> tuple[int | None, ...]:
    """A caption listing more than 8 objects is wrong anyway; match greedily instead of exhaustively."""
    free, out = set(range(len(said))), []
    for t in truth:
        j = min(free, key=lambda k: len(_wrong(t, said[k])), default=None)
        if j is not None and len(_wrong(t, said[j])) <= MAX_WRONG_TO_MATCH:
            free.discard(j)
            out.append(j)
        else:
            out.append(None)
    return tuple(out)


def score_caption(caption: str, truth: Scene, key: str = "") -> SampleFidelity:
    parsed = parse_caption(caption)
    pairs, missed, hallucinated = match_objects(list(truth.objects), list(parsed.objects))
    errors = Counter({k: 0 for k in ERROR_KINDS})
    errors["missed"] = len(missed)
    errors["hallucinated"] = len(hallucinated) + len(parsed.partial)  # half-described objects count too
    for t, s in pairs:
        errors.update(f"wrong_{a}" for a in _wrong(t, s))
    errors["false_relations"] = sum(holds is False for *_, holds in parsed.relations)
    scene_match = parsed.scene == truth
    return SampleFidelity(key, len(truth), scene_match and parsed.clean, scene_match, dict(errors),
                          list(parsed.problems), caption)


# ----------------------------------------------------------------------------- aggregation

def _aggregate(samples: list[SampleFidelity]) -> dict:
    n = len(samples)
    objects = sum(s.num_objects for s in samples)
    totals = Counter()
    for s in samples:
        totals.update(s.errors)
    out = {"captions": n, "true_objects": objects,
           "exact_match": _rate(sum(s.exact for s in samples), n),
           "scene_match": _rate(sum(s.scene_match for s in samples), n),
           "clean_parse": _rate(sum(not s.problems for s in samples), n),
           "errors": {k: totals[k] for k in ERROR_KINDS},
           "errors_per_object": {k: _rate(totals[k], objects) for k in ERROR_KINDS}}
    return out


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def summarize(samples: list[SampleFidelity]) -> dict:
    by_count: dict[int, list[SampleFidelity]] = defaultdict(list)
    for s in samples:
        by_count[s.num_objects].append(s)
    return {"overall": _aggregate(samples),
            "by_object_count": {str(k): _aggregate(v) for k, v in sorted(by_count.items())}}


def score_all(captions: dict[str, str], truths: dict[str, Scene]) -> tuple[list[SampleFidelity], list[str]]:
    """Score every key with both a caption and a truth; returns (scores, keys without a caption)."""
    missing = sorted(k for k in truths if k not in captions)
    scores = [score_caption(captions[k], truths[k], k) for k in sorted(truths) if k in captions]
    return scores, missing


# ----------------------------------------------------------------------------- reports

def write_report(summary: dict, samples: list[SampleFidelity], out_dir: str | Path, meta: dict) -> None:
    """fidelity.json (numbers + provenance), fidelity.md (tables), samples.jsonl (every caption)."""
    out = Path(out_dir)
    atomic_write_text(out / "fidelity.json", json.dumps({**meta, **summary}, indent=2, sort_keys=True))
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in samples))
    atomic_write_text(out / "fidelity.md", render_markdown(summary, samples, meta))


ERROR_COLUMNS = ("hallucinated", "missed", "wrong_color", "wrong_shape", "wrong_size", "wrong_position",
                 "false_relations")


def render_markdown(summary: dict, samples: list[SampleFidelity], meta: dict) -> str:
    rows = [("all", summary["overall"])] + [(f"{k} object(s)", v) for k, v in summary["by_object_count"].items()]
    lines = ["# Caption fidelity", "", f"Captions from: `{_md(meta.get('captions_from', '?'))}`; "
             f"truth from: `{_md(meta.get('shards', '?'))}`.", ""]
    lines += md_table(["scenes", "captions", "exact match", "scene match", "clean parse", "hallucinated", "missed",
                       "wrong colour", "wrong shape", "wrong size", "wrong position", "false relations"],
                      [[name, agg["captions"], _pct(agg["exact_match"]), _pct(agg["scene_match"]),
                        _pct(agg["clean_parse"]), *(agg["errors"][k] for k in ERROR_COLUMNS)] for name, agg in rows])
    lines += ["", "Exact match: the parse is clean and its scene equals the truth. Error columns count "
              "objects (hallucinated, missed), attributes of matched objects, and relation sentences.", ""]
    wrong = [s for s in samples if not s.exact][:10]
    if wrong:
        lines += ["## First non-exact captions", ""]
        lines += [f"- `{_md(s.key)}` ({s.num_objects} objects): {md_text(s.caption)} "
                  f"- {md_text('; '.join(s.problems) or _error_text(s.errors))}" for s in wrong]
    return "\n".join(lines) + "\n"


def _error_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items() if v) or "scene differs"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _md(text: str) -> str:
    """Inside a code span (keys, paths): HTML and pipes escaped, no backtick to end the span."""
    return html.escape(str(text)).replace("|", "\\|").replace("`", "'").replace("\n", " ")


# ----------------------------------------------------------------------------- inputs

def read_truth(shards: str, min_objects: int = 1, max_objects: int = 4, limit: int | None = None
               ) -> tuple[dict[str, Scene], dict[str, object], Counter]:
    """True scenes (and images) by key from shapes-world shards; also a Counter of skip reasons."""
    from .images import BadImage, decode_image

    scenes, images, skipped = {}, {}, Counter()
    for shard in expand_shards(shards):
        for sample in iter_tar_samples(shard):
            try:
                scene = Scene.from_dict(json.loads(sample.files["json"].decode("utf-8"))["scene"])
                image = decode_image(sample.files.get("png") or sample.files.get("jpg") or b"").image
            except (KeyError, ValueError, TypeError, UnicodeDecodeError, BadImage) as exc:
                skipped[f"{type(exc).__name__}: {exc}"[:120]] += 1
                continue
            if not min_objects <= len(scene) <= max_objects:
                continue
            scenes[sample.key], images[sample.key] = scene, image
            if limit and len(scenes) >= limit:
                return scenes, images, skipped
    return scenes, images, skipped


def read_sidecar_captions(folder: str | Path) -> dict[str, str]:
    """`re_caption` by key from recaption sidecars (rows whose status is not ok are left out)."""
    import pyarrow.parquet as pq

    out = {}
    files = sorted(Path(folder).glob("*.parquet")) if Path(folder).is_dir() else expand_shards(folder, (".parquet",))
    if not files:
        raise FileNotFoundError(f"{folder}: no .parquet sidecars")
    for path in files:
        table = pq.read_table(path, columns=["key", "re_caption", "status"]).to_pylist()
        out.update({r["key"]: r["re_caption"] for r in table if r["re_caption"] is not None
                    and r["status"] in ("ok", "success")})
    return out


def caption_with_model(model_dir: str, images: dict, batch_size: int = 32, max_new_tokens: int = 128,
                       preset: str = "recap") -> dict[str, str]:
    """Greedy captions for every image, through the captioner backend (the same path as `caption run`)."""
    from .backend import TransformersBackend
    from .prompts import build_prompt

    backend = TransformersBackend(model_dir)
    keys = list(images)
    out = {}
    for i in range(0, len(keys), batch_size):
        chunk = keys[i : i + batch_size]
        gens = backend.caption([images[k] for k in chunk], [build_prompt(preset, None)] * len(chunk),
                               max_new_tokens=max_new_tokens)
        out.update({k: g.text for k, g in zip(chunk, gens)})
    return out


@dataclasses.dataclass
class FidelityConfig:
    """What `t2i-recap caption fidelity` scores (its flags, or --config / --set)."""

    shards: str = ""
    """Shapes-world shards (truth: the json's scene)."""
    out: str = ""
    """Output folder for fidelity.json / .md / samples.jsonl."""
    model: str | None = None
    """Captioner folder: caption the images now (greedy). One of model, sidecars, caption_field."""
    sidecars: str | None = None
    """Recaption sidecars (parquet) to score."""
    caption_field: str | None = None
    """Score a caption stored in the shard json, e.g. gold_caption."""
    min_objects: int = 1
    """Score scenes with at least this many objects."""
    max_objects: int = 4
    """Score scenes with at most this many objects."""
    limit: int | None = None
    """Score at most this many scenes."""
    batch_size: int = 32
    """Images per captioning batch (with model)."""
    max_new_tokens: int = 128
    """Captioner token cap (with model)."""

    def __post_init__(self) -> None:
        if self.min_objects < 1 or self.max_objects < self.min_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")

    def check_source(self) -> None:
        given = [name for name in ("model", "sidecars", "caption_field") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --model, --sidecars, --caption-field (got {given or 'none'})")


FLAGS = {"--shards": "shards", "--model": "model", "--sidecars": "sidecars", "--caption-field": "caption_field",
         "--out": "out", "--min-objects": "min_objects", "--max-objects": "max_objects", "--limit": "limit",
         "--batch-size": "batch_size", "--max-new-tokens": "max_new_tokens"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i-recap caption fidelity", description=__doc__.split("\n")[0])
    add_config_arguments(parser, FidelityConfig, FLAGS, required=("--shards", "--out"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = config_from_args(FidelityConfig, parser.parse_args(argv))
        args.check_source()
    except ValueError as exc:  # ConfigError included
        parser.error(str(exc))
    setup_logging()
    truths, images, skipped = read_truth(args.shards, args.min_objects, args.max_objects, args.limit)
    if not truths:
        raise SystemExit(f"{args.shards}: no scenes with {args.min_objects}-{args.max_objects} objects")
    if args.model:
        captions = caption_with_model(args.model, images, args.batch_size, args.max_new_tokens)
    elif args.sidecars:
        captions = read_sidecar_captions(args.sidecars)
    else:
        captions = read_field_captions(args.shards, args.caption_field)
    samples, missing = score_all(captions, truths)
    summary = summarize(samples)
    meta = {"shards": args.shards, "captions_from": args.model or args.sidecars or f"json:{args.caption_field}",
            "objects": [args.min_objects, args.max_objects], "max_new_tokens": args.max_new_tokens,
            "uncaptioned_keys": len(missing), "skipped_samples": dict(skipped)}
    write_report(summary, samples, args.out, meta)
    o = summary["overall"]
    per_count = ", ".join(f"{k} obj: {_pct(v['exact_match'])}" for k, v in summary["by_object_count"].items())
    print(f"exact match {_pct(o['exact_match'])} over {o['captions']} captions ({per_count}); "
          f"report in {args.out}/fidelity.md")
    return 0


def read_field_captions(shards: str, field: str) -> dict[str, str]:
    out = {}
    for shard in expand_shards(shards):
        for sample in iter_tar_samples(shard):
            try:
                value = json.loads(sample.files["json"].decode("utf-8")).get(field)
            except (KeyError, ValueError, UnicodeDecodeError):
                continue
            if isinstance(value, str):
                out[sample.key] = value
    return out


if __name__ == "__main__":
    raise SystemExit(main())
