"""`t2i-recap caption stats`: what recaptioning did to the captions, from the sidecars alone.

`t2i-recap caption stats --sidecars DIR [--clip PATH] [--images SHARDS] --out DIR` writes
stats.json, stats.md and lengths.png:

* length distributions of original vs recaption, in words (as Recap-DataComp-1B's re_length /
  org_length: mean 49.4 vs 10.2, docs/references.md section 1) and in tokens of a named tokenizer;
* vocabulary size of each side and their overlap;
* share of recaptions that hit the generation cap (finish_reason "length") and repetition rate;
* CLIP score (torchmetrics `CLIPScore`, a local CLIP passed as a callable) of the image against
  the original and against the recaption. CLIP reads at most `max_position_embeddings` tokens
  (77): longer captions are cut to that many tokens with the end token kept, the count of cut
  captions is reported, and the score is also given over the pairs where neither side was cut;
* throughput (images/s per process) from the provenance each sidecar carries.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import re
import statistics
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.extras import available
from t2i_recap.io import atomic_path, atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.markdown import md_table
from t2i_recap.shards import shard_id

from .writer import read_info

log = get_logger(__name__)

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclasses.dataclass
class Sidecars:
    """All rows of a folder of sidecars plus each file's provenance."""

    rows: list[dict]
    infos: list[dict]
    files: list[Path]


def read_sidecars(folder: str | Path) -> Sidecars:
    path = Path(folder)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else sorted(path.parent.glob(path.name))
    rows, infos, used = [], [], []
    for f in files:
        try:
            info = read_info(f)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{f}: not a readable parquet file ({exc})") from None
        if info is None:  # e.g. img2dataset's own 00000.parquet beside the shards
            log.warning("%s is not a recaption sidecar (no t2i_recap metadata); left out", f)
            continue
        # Keys are unique per shard only (merged downloads repeat them): rows carry their shard's id.
        shard = (info.get("shard") or {}).get("name") or shard_id(f)
        rows.extend({**row, "shard": shard} for row in pq.read_table(f).to_pylist())
        infos.append(info)
        used.append(f)
    if not used:
        raise FileNotFoundError(f"{folder}: no recaption sidecars (*.parquet with t2i_recap metadata)")
    return Sidecars(rows, infos, used)


# ----------------------------------------------------------------------------- text statistics

def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def distribution(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    arr = np.asarray(values)
    return {"count": len(values), "mean": round(float(arr.mean()), 3), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "min": int(arr.min()), "max": int(arr.max())}


def vocabulary(org: list[str], re_: list[str]) -> dict:
    a = Counter(w for t in org for w in words(t))
    b = Counter(w for t in re_ for w in words(t))
    both = set(a) & set(b)
    union = set(a) | set(b)
    return {"original": len(a), "recaption": len(b), "shared": len(both),
            "jaccard": round(len(both) / len(union), 4) if union else None,
            "recaption_words_in_original_vocab": round(len(both) / len(b), 4) if b else None,
            "top_recaption_words_not_in_original": [w for w, _ in b.most_common() if w not in a][:20]}


def token_lengths(texts: list[str], tokenizer) -> list[int]:
    """Tokens per caption including the tokenizer's own special tokens (what a text encoder reads)."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


def caption_stats(rows: list[dict], tokenizer=None, max_new_tokens: int | None = None) -> dict:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("re_caption") is not None]
    org = [r["org_caption"] for r in rows if r.get("org_caption")]
    rec = [r["re_caption"] for r in ok]
    out = {
        "rows": len(rows),
        "status": dict(Counter(r.get("status") for r in rows)),
        "errors": dict(Counter(r["error"] for r in rows if r.get("error")).most_common(10)),
        "originals_missing": len(rows) - len(org),
        "words": {"original": distribution([len(t.split()) for t in org]),
                  "recaption": distribution([len(t.split()) for t in rec])},
        "vocabulary": vocabulary(org, rec),
        "hit_token_cap": _share(sum(r.get("finish_reason") == "length" for r in ok), len(ok)),
        "repetition": _share(sum(bool(r.get("repetition")) for r in ok), len(ok)),
        "generated_tokens": distribution([r["re_num_tokens"] for r in ok if r.get("re_num_tokens") is not None]),
        "max_new_tokens": max_new_tokens,
    }
    if tokenizer is not None:
        out["tokens"] = {"tokenizer": getattr(tokenizer, "name_or_path", None),
                         "original": distribution(token_lengths(org, tokenizer)),
                         "recaption": distribution(token_lengths(rec, tokenizer))}
    return out


def _share(num: int, den: int) -> dict:
    return {"count": num, "of": den, "share": round(num / den, 4) if den else None}


def throughput(infos: list[dict]) -> dict:
    """Images/s per process, from each sidecar's counts and seconds (wall time of that shard)."""
    seconds = sum((i.get("counts") or {}).get("seconds", 0.0) or 0.0 for i in infos)
    counts = Counter()
    for i in infos:
        counts.update({k: v for k, v in (i.get("counts") or {}).items() if isinstance(v, int)})
    captioned = counts.get("ok", 0) + counts.get("failed", 0)
    per_shard = [i["images_per_second"] for i in infos if i.get("images_per_second")]
    return {"shards": len(infos), "captioned": captioned, "process_seconds": round(seconds, 3),
            "images_per_second_per_process": round(captioned / seconds, 4) if seconds > 0 else None,
            "median_shard_images_per_second": statistics.median(per_shard) if per_shard else None,
            "world_sizes": sorted({i.get("world_size", 1) for i in infos}),
            "models": sorted({str(i.get("model")) for i in infos}),
            "devices": sorted({str((i.get("backend") or {}).get("device")) for i in infos})}


# ----------------------------------------------------------------------------- CLIP score

def clip_scores(pairs: list[tuple[object, str, str]], clip_path: str, batch_size: int = 64) -> dict:
    """CLIP score of (image, original) and (image, recaption), over all pairs and the un-cut ones.

    Scoring goes through the evaluation package's torchmetrics wrapper, which cuts long text in
    the tokenizer (keeping the end token CLIP pools from) instead of slicing ids as torchmetrics does.
    """
    from t2i_recap.clip_score import ClipScorer

    scorer = ClipScorer(clip_path)
    limit = scorer.max_length
    images = [p[0] for p in pairs]
    out = {"clip": str(clip_path), "pairs": len(pairs), "max_tokens": limit}
    lengths = {side: scorer.token_lengths([p[i] for p in pairs]) for i, side in ((1, "original"), (2, "recaption"))}
    uncut = [lo <= limit and lr <= limit for lo, lr in zip(lengths["original"], lengths["recaption"])]
    out["pairs_uncut"] = sum(uncut)
    for i, side in ((1, "original"), (2, "recaption")):
        scores = scorer.score(images, [p[i] for p in pairs], batch_size)
        kept = [s for s, ok in zip(scores, uncut) if ok]
        out[side] = {"score": _mean(scores), "score_uncut_pairs": _mean(kept),
                     "cut_to_max_tokens": _share(sum(n > limit for n in lengths[side]), len(pairs))}
    return out


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def images_by_key(source: str, keys: set[tuple[str, str]], shard: str | None = None) -> dict:
    """Images of `keys` ((shard id, key) pairs) read from the captioner's input (any format `caption run` reads).

    `shard`: the id the sidecar recorded for `source` (its samples are that shard's), else each shard's own id.
    """
    from .readers import open_shards

    out = {}
    for part in open_shards(source):
        name = shard or part.name
        for sample in part.samples():
            if (name, sample.key) in keys and sample.image is not None:
                out[(name, sample.key)] = sample.image
    return out


# ----------------------------------------------------------------------------- outputs

def plot_lengths(stats: dict, word_lists: dict[str, list[int]], token_lists: dict[str, list[int]] | None,
                 path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("words", word_lists)] + ([("tokens", token_lists)] if token_lists else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (unit, lists) in zip(axes[0], panels):
        top = max([max(v) for v in lists.values() if v] + [1])
        bins = np.linspace(0, top + 1, min(50, top + 2))
        for name, values in lists.items():
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (mean {np.mean(values) if values else 0:.1f})")
        if unit == "tokens" and stats.get("clip_score"):
            ax.axvline(stats["clip_score"]["max_tokens"], color="k", ls="--", lw=1, label="CLIP max tokens")
        ax.set_xlabel(f"caption length ({unit})")
        ax.set_ylabel("captions")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def render_markdown(stats: dict) -> str:
    c = stats["captions"]
    w = c["words"]
    lines = ["# Recaption statistics", "", f"Sidecars: `{_md(stats['sidecars'])}` ({stats['files']} files, "
             f"{c['rows']} rows; status {_md(json.dumps(c['status']))}).", ""]
    table = [["mean words", w["original"].get("mean", "-"), w["recaption"].get("mean", "-")],
             ["median / p90 words", f"{w['original'].get('median', '-')} / {w['original'].get('p90', '-')}",
              f"{w['recaption'].get('median', '-')} / {w['recaption'].get('p90', '-')}"]]
    if "tokens" in c:
        t = c["tokens"]
        table.append([f"mean tokens ({_md(t['tokenizer'])})", t["original"].get("mean", "-"), t["recaption"].get("mean", "-")])
    v = c["vocabulary"]
    table.append(["vocabulary (words)", v["original"], v["recaption"]])
    clip = stats.get("clip_score")
    if clip:
        for key, label in (("score", "CLIP score"), ("score_uncut_pairs", "CLIP score, uncut pairs only")):
            table.append([label, clip["original"][key], clip["recaption"][key]])
        table.append([f"cut to {clip['max_tokens']} CLIP tokens", _pct(clip["original"]["cut_to_max_tokens"]),
                      _pct(clip["recaption"]["cut_to_max_tokens"])])
    lines += md_table(["", "original", "recaption"], table)
    lines += ["", f"- Shared vocabulary: {v['shared']} words (Jaccard {v['jaccard']}); "
              f"{_pct_of(v['recaption_words_in_original_vocab'])} of the recaption vocabulary occurs in the originals.",
              f"- Recaptions that hit the {c['max_new_tokens'] or '?'}-token cap: {_pct(c['hit_token_cap'])}; "
              f"flagged as repetitive: {_pct(c['repetition'])}."]
    if clip:
        lines.append(f"- CLIP ({_md(clip['clip'])}) reads at most {clip['max_tokens']} tokens: longer captions "
                     "were cut to that many tokens with the end token kept; the uncut row scores only the "
                     f"{clip['pairs_uncut']} of {clip['pairs']} pairs where neither caption was cut.")
    else:
        lines.append("- CLIP score: not computed (pass --clip and, if the sidecars do not name readable "
                     "shards, --images).")
    tp = stats["throughput"]
    lines.append(f"- Throughput: {tp['images_per_second_per_process']} images/s per process "
                 f"({tp['captioned']} images over {tp['process_seconds']} process-seconds, {tp['shards']} shards, "
                 f"devices {_md(', '.join(tp['devices']))}, model {_md(', '.join(tp['models']))}).")
    lines += ["", "![caption lengths](lengths.png)" if "plot_skipped" not in stats
              else f"(caption-length plot not drawn: {stats['plot_skipped']})", ""]
    return "\n".join(lines)


def _pct(share: dict) -> str:
    return "-" if share.get("share") is None else f"{100 * share['share']:.1f}% ({share['count']}/{share['of']})"


def _pct_of(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _md(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("`", "'")


# ----------------------------------------------------------------------------- command

def read_released(pattern: str, images: str, join_on: str, min_coverage: float) -> tuple[Sidecars, dict]:
    """The released Recap-DataComp-1B captions of the samples of the download `images`, joined by
    sha256 or url (t2i_recap.released), as sidecar rows; plus the match report."""
    from t2i_recap.released import expand, join_download

    rows, report = join_download(pattern, images, join_on, min_coverage)
    return Sidecars(rows, [], expand(pattern)), report


def compute_stats(sidecars_dir: str | None, clip: str | None = None, tokenizer: str | None = None,
                  images: str | None = None, released: str | None = None, join_on: str = "sha256",
                  min_coverage: float = 0.99) -> tuple[dict, dict]:
    """Returns (stats, length lists for the histogram); `released` reads the released captions
    instead of sidecars, joined to the download `images`."""
    from transformers import AutoTokenizer

    report = None
    if released:
        if not images:
            raise ValueError("--released needs --images: the img2dataset download to join the released captions to")
        side, report = read_released(released, images, join_on, min_coverage)
    else:
        side = read_sidecars(sidecars_dir)
    models = {str(i.get("model")) for i in side.infos}
    captioner = next(iter(models)) if len(models) == 1 and Path(next(iter(models))).is_dir() else None
    tok_path = tokenizer or clip or captioner  # CLIP's tokenizer first: its 77-token limit is the trap
    tok = AutoTokenizer.from_pretrained(tok_path) if tok_path else None
    caps = {int(i.get("generation", {}).get("max_new_tokens") or 0) for i in side.infos} - {0}
    stats = {"sidecars": str(released or sidecars_dir), "files": len(side.files),
             "captions": caption_stats(side.rows, tok, max(caps) if caps else None),
             "throughput": throughput(side.infos)}
    if report is not None:
        stats["released"] = report
    ok = [r for r in side.rows if r.get("status") == "ok" and r.get("re_caption") is not None]
    org = [r["org_caption"] for r in side.rows if r.get("org_caption")]
    lists = {"words": {"original": [len(t.split()) for t in org], "recaption": [len(r["re_caption"].split()) for r in ok]},
             "tokens": {"original": token_lengths(org, tok), "recaption": token_lengths([r["re_caption"] for r in ok], tok)}
             if tok else None}
    if clip:
        stats["clip_score"] = _clip_section(side, ok, clip, images)
    return stats, lists


def _clip_section(side: Sidecars, ok: list[dict], clip: str, images: str | None) -> dict | None:
    sources = [(images, None)] if images else sorted({(str((i.get("shard") or {}).get("source")), (i.get("shard") or {}).get("name"))
                                                      for i in side.infos}, key=str)
    wanted = {(r["shard"], r["key"]) for r in ok if r.get("org_caption")}
    found: dict = {}
    for source, shard in sources:
        try:
            found.update(images_by_key(source, wanted, shard))
        except (FileNotFoundError, ValueError) as exc:
            log.warning("CLIP score: cannot read images from %s (%s); pass --images", source, exc)
    pairs = [(found[(r["shard"], r["key"])], r["org_caption"], r["re_caption"]) for r in ok
             if (r["shard"], r["key"]) in found and r.get("org_caption")]
    if not pairs:
        log.warning("CLIP score skipped: no image found for any captioned row")
        return None
    section = clip_scores(pairs, clip)
    section["rows_without_image"] = len(wanted) - len(pairs)
    return section


@dataclasses.dataclass
class StatsConfig:
    """What `t2i-recap caption stats` reads and writes (its flags, or --config / --set)."""

    sidecars: str | None = None
    """Folder of recaption sidecars (*.parquet). One of sidecars, released."""
    released: str | None = None
    """The released Recap-DataComp-1B parquet (file, folder or glob), joined to the download given by --images."""
    join_on: typing.Literal["sha256", "url"] = "sha256"
    """--released: the column the release and the samples' .json share."""
    min_coverage: float = 0.99
    """--released: fail when a smaller share of the samples matches a released row."""
    out: str = ""
    """Folder for stats.json, stats.md, lengths.png."""
    clip: str | None = None
    """Local CLIP folder: CLIP score of original vs recaption."""
    tokenizer: str | None = None
    """Tokenizer for token lengths (default: the CLIP's, else the captioner's)."""
    images: str | None = None
    """The captioned input (default: the shard sources in the sidecars)."""

    def check_source(self) -> None:
        if bool(self.sidecars) == bool(self.released):
            raise ValueError("give exactly one of --sidecars, --released")


FLAGS = {"--sidecars": "sidecars", "--released": "released", "--join-on": "join_on", "--min-coverage": "min_coverage",
         "--out": "out", "--clip": "clip", "--tokenizer": "tokenizer", "--images": "images"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i-recap caption stats", description=__doc__.split("\n")[0])
    add_config_arguments(parser, StatsConfig, FLAGS, required=("--out",))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = config_from_args(StatsConfig, parser.parse_args(argv))
        args.check_source()
    except ValueError as exc:  # ConfigError included
        parser.error(str(exc))
    setup_logging()
    stats, lists = compute_stats(args.sidecars, args.clip, args.tokenizer, args.images, args.released,
                                 args.join_on, args.min_coverage)
    out = Path(args.out)
    if not available("matplotlib"):  # the plot only: stats.json and stats.md are complete without it
        stats["plot_skipped"] = "matplotlib is not installed (pip install 't2i-recap[caption]')"
        log.warning("lengths.png not drawn: %s", stats["plot_skipped"])
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True))
    if "plot_skipped" not in stats:
        plot_lengths(stats, lists["words"], lists["tokens"], out / "lengths.png")
    atomic_write_text(out / "stats.md", render_markdown(stats))
    w = stats["captions"]["words"]
    print(f"mean words: original {w['original'].get('mean')} vs recaption {w['recaption'].get('mean')}; "
          f"report in {out}/stats.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
