"""`t2i-recap shapes assets`: build the shapes world's tiny pretrained parts, or reuse them.

DIR/tokenizer  byte-level BPE (AutoTokenizer)
DIR/clip       CLIPModel + tokenizer + CLIPImageProcessor (the paper's Recap-CLIP at toy scale)
DIR/vae        AutoencoderKL with a measured scaling_factor
DIR/clip_text  the CLIP's text tower alone (CLIPTextModel + tokenizer), derived from DIR/clip: the
               text encoder a trainer loads with the class it is (no report of unused vision keys)
DIR/assets.json  fingerprints, quality numbers, seeds, timings

The package ships one prebuilt set (`t2i_recap/shapes/prebuilt/`, 1.9 MB of safetensors and JSON,
made by this command with the default AssetsConfig): a part that is neither in DIR nor reusable
there is copied from it when its portable fingerprint (settings, code, but not the library
versions) matches and it loads here, the way a real pipeline downloads a pretrained CLIP and VAE
instead of training them. `--no-prebuilt` (or other settings) builds from scratch (~15 min here).

Each part has a fingerprint (its settings, the source of the code that shapes it, library
versions); a part whose fingerprint matches and which loads is reused, any other is rebuilt in a
temporary folder and renamed into place, and assets.json is rewritten after each part, so an
interrupted build resumes with the parts already done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError, to_dict
from t2i_recap.io import atomic_write_text, output_dir
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.shapes.train_clip import ClipTrainConfig
from t2i_recap.shapes.train_vae import VaeTrainConfig

log = get_logger(__name__)

# Bump when the layout of the folder or the meaning of a setting changes.
ASSETS_VERSION = 1
MANIFEST = "assets.json"
PREBUILT = Path(__file__).resolve().parent / "prebuilt"
PARTS = ("tokenizer", "clip", "vae")
# Modules whose source decides what each part learns or how it is scored: editing them
# invalidates that part (the shapes world itself, the trainers, the oracle behind the VAE gate).
_WORLD = ("t2i_recap.shapes.world", "t2i_recap.shapes.render", "t2i_recap.shapes.captions",
          "t2i_recap.shapes.scene_batches")
PART_SOURCES = {
    "tokenizer": ("t2i_recap.shapes.tokenizer", "t2i_recap.shapes.world", "t2i_recap.shapes.captions"),
    "clip": (*_WORLD, "t2i_recap.shapes.train_clip"),
    "vae": (*_WORLD, "t2i_recap.shapes.train_vae", "t2i_recap.shapes.oracle"),
}
PART_LIBRARIES = {
    "tokenizer": ("tokenizers", "transformers"),
    "clip": ("torch", "transformers", "tokenizers"),
    "vae": ("torch", "diffusers"),
}


@dataclasses.dataclass
class AssetsConfig:
    """What `t2i-recap shapes assets` builds, and the quality it must reach."""

    seed: int = 0
    """Base seed: model init, training data and held-out scenes all derive from it."""
    resolution: int = 32
    """Image side in pixels the CLIP and VAE are trained at."""
    clip: ClipTrainConfig = dataclasses.field(default_factory=ClipTrainConfig)
    """The tiny CLIP."""
    vae: VaeTrainConfig = dataclasses.field(default_factory=VaeTrainConfig)
    """The tiny VAE."""
    min_clip_r_at_1: float = 0.5
    """Gate: CLIP text-to-image R@1 among clip.eval_scenes held-out scenes (gate: >= 0.5)."""
    min_clip_binding_r_at_1: float = 0.5
    """Gate: CLIP binding R@1, each held-out caption against its own image and clip.eval_variants hard
    negatives (objects moved, colours or shapes swapped); chance is 0.2 with 4 variants. A CLIP that
    only sees which colours and shapes appear fails it, and then the DiT cannot learn positions."""
    min_oracle_agreement: float = 0.98
    """Gate: share of held-out scenes the oracle reads identically before and after the VAE."""

    def __post_init__(self) -> None:
        if self.resolution < 12:
            raise ValueError(f"resolution must be >= 12 (a 3x3 grid of shapes), got {self.resolution}")
        for name in ("min_clip_r_at_1", "min_clip_binding_r_at_1", "min_oracle_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


# ---------------------------------------------------------------- fingerprints


def _library_versions(names) -> dict[str, str]:
    return {name: importlib.import_module(name).__version__ for name in names}


def _source_hash(modules) -> str:
    digest = hashlib.sha256()
    for name in modules:
        path = importlib.import_module(name).__file__
        digest.update(name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return digest.hexdigest()


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def part_fingerprints(cfg: AssetsConfig, libraries: bool = True) -> dict[str, str]:
    """One fingerprint per part; the CLIP's includes the tokenizer's (it is trained on its ids).
    `libraries=False` leaves out the library versions: the portable fingerprint a prebuilt part is
    matched by (weights saved as safetensors load across versions; `_loads` checks they do)."""
    settings = {
        "tokenizer": {},
        "clip": {"seed": cfg.seed, "resolution": cfg.resolution, "clip": to_dict(cfg.clip)},
        "vae": {"seed": cfg.seed, "resolution": cfg.resolution, "vae": to_dict(cfg.vae)},
    }
    out: dict[str, str] = {}
    for part in PARTS:
        out[part] = _hash({
            "version": ASSETS_VERSION, "settings": settings[part],
            "sources": _source_hash(PART_SOURCES[part]),
            "libraries": _library_versions(PART_LIBRARIES[part]) if libraries else None,
            "upstream": out.get("tokenizer") if part == "clip" else None,
        })
    return out


# ---------------------------------------------------------------- building parts


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder, so concurrent builders (test workers, two shells
    pointed at one cache) take turns instead of renaming over each other's parts."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, builds must not overlap
        yield
        return
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_dir(out: Path, part: str, build: Callable[[Path], dict]) -> dict:
    """Run `build` into a temporary folder and rename it onto out/part (old copy removed after).

    An existing out/part is replaced only when this command wrote it: its marker file says so, or
    assets.json lists it (parts built before the marker existed); a folder of the user's is refused.
    """
    owned = part in read_manifest(out).get("parts", {})
    with output_dir(out / part, kind=f"shapes-{part}", overwrite=True, owned=owned) as tmp:
        return build(tmp)


def _build_tokenizer(folder: Path, cfg: AssetsConfig, out: Path) -> dict:
    from t2i_recap.shapes.tokenizer import build_tokenizer

    tok = build_tokenizer(folder)
    return {"vocab_size": len(tok), "model_max_length": tok.model_max_length,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _build_clip(folder: Path, cfg: AssetsConfig, out: Path) -> dict:
    from transformers import AutoTokenizer

    from t2i_recap.shapes.train_clip import build_trained_clip

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    return build_trained_clip(folder, tokenizer, cfg.clip, cfg.resolution, cfg.seed)


def _build_vae(folder: Path, cfg: AssetsConfig, out: Path) -> dict:
    from t2i_recap.shapes.train_vae import build_trained_vae

    return build_trained_vae(folder, cfg.vae, cfg.resolution, cfg.seed + 1000)


_BUILDERS = {"tokenizer": _build_tokenizer, "clip": _build_clip, "vae": _build_vae}
# Derived from a part (never shipped, never fingerprinted on its own): rewritten whenever its source
# part's fingerprint changes, so the prebuilt set and its fingerprints stay as they are.
DERIVED = {"clip_text": "clip"}


def _build_clip_text(folder: Path, out: Path) -> None:
    """The CLIPModel's text tower saved as a CLIPTextModel folder, with the CLIP's tokenizer."""
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(str(out / "clip"))
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())  # strict: every weight of the tower, nothing else
    text.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(out / "clip")).save_pretrained(str(folder))


DERIVED_RECORD = "derived_from.json"


def _derive_parts(out: Path) -> None:
    """Write each derived folder whose record names another source fingerprint than assets.json's."""
    parts = read_manifest(out).get("parts", {})
    for derived, source in DERIVED.items():
        source_fp = parts.get(source, {}).get("fingerprint")
        if source_fp is None:
            continue
        record = out / derived / DERIVED_RECORD
        want = {"derived_from": source, "source_fingerprint": source_fp}
        if record.is_file() and json.loads(record.read_text(encoding="utf-8")) == want:
            continue
        log.info("%s: writing %s from %s", out, derived, source)

        def build(folder: Path) -> None:
            _build_clip_text(folder, out)
            (folder / DERIVED_RECORD).write_text(json.dumps(want, indent=1), encoding="utf-8")
        _build_dir(out, derived, build)


def _loads(part: str, folder: Path) -> bool:
    """Whether a saved part loads with the from_pretrained call its users make."""
    if not folder.is_dir():
        return False
    try:
        if part == "tokenizer":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(folder))
        elif part == "clip":
            from transformers import CLIPModel, CLIPProcessor

            CLIPModel.from_pretrained(str(folder))
            CLIPProcessor.from_pretrained(str(folder))
        else:
            from diffusers import AutoencoderKL

            AutoencoderKL.from_pretrained(str(folder))
    except Exception as exc:  # any load failure means: rebuild this part
        log.warning("%s: saved %s does not load (%s); rebuilding it", folder, part, exc)
        return False
    return True


# ---------------------------------------------------------------- manifest


def read_manifest(out_dir: str | Path) -> dict:
    """DIR/assets.json, or {} when it is missing or unreadable (then everything is rebuilt)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s is unreadable (%s); rebuilding every part", path, exc)
        return {}
    return data if isinstance(data, dict) and data.get("version") == ASSETS_VERSION else {}


def _write_manifest(out: Path, cfg: AssetsConfig, parts: dict, fingerprints: dict[str, str]) -> dict:
    complete = all(p in parts for p in PARTS)
    manifest = {
        "format": "t2i-recap-shapes-assets",
        "version": ASSETS_VERSION,
        "fingerprint": _hash(fingerprints) if complete else None,
        "complete": complete,
        "config": to_dict(cfg),
        "seeds": {"clip": cfg.seed, "vae": cfg.seed + 1000},
        "libraries": _library_versions(sorted({n for names in PART_LIBRARIES.values() for n in names})),
        "parts": parts,
        "quality": quality_rows({"parts": parts}, cfg),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def quality_rows(manifest: dict, cfg: AssetsConfig) -> list[dict]:
    """The gated numbers: metric, value, threshold, passed (value None when the part is missing)."""
    parts = manifest.get("parts", {})
    clip = parts.get("clip", {}).get("quality", {})
    vae = parts.get("vae", {}).get("quality", {})
    rows = [
        ("clip", f"text-to-image R@1 among {clip.get('eval_scenes', cfg.clip.eval_scenes)} held-out scenes",
         clip.get("text_to_image_r_at_1"), cfg.min_clip_r_at_1),
        ("clip", f"binding R@1, caption vs its image and {cfg.clip.eval_variants} hard negatives",
         clip.get("binding_r_at_1"), cfg.min_clip_binding_r_at_1),
        ("vae", f"oracle agreement, original vs reconstruction ({vae.get('eval_scenes', cfg.vae.eval_scenes)} scenes)",
         vae.get("oracle_agreement"), cfg.min_oracle_agreement),
    ]
    return [{"part": p, "metric": m, "value": v, "min": t, "passed": v is not None and v >= t}
            for p, m, v, t in rows]


def gate_failures(out_dir: str | Path, cfg: AssetsConfig | None = None) -> list[str]:
    """Human-readable failed gates of a built folder ([] when every gate holds)."""
    cfg = cfg or AssetsConfig()
    rows = quality_rows(read_manifest(out_dir), cfg)
    return [f"{r['part']}: {r['metric']} = {r['value']} (needs >= {r['min']})" for r in rows if not r["passed"]]


# ---------------------------------------------------------------- API


def _prebuilt_part(part: str, portable: str, prebuilt: Path) -> dict | None:
    """The prebuilt part's manifest entry when it matches `portable` and loads here, else None."""
    entry = read_manifest(prebuilt).get("parts", {}).get(part)
    if not entry or entry.get("portable_fingerprint") != portable:
        return None
    return entry if _loads(part, prebuilt / part) else None


def _copy_part(src: Path) -> Callable[[Path], None]:
    def copy(folder: Path) -> None:
        shutil.copytree(src, folder, dirs_exist_ok=True)
    return copy


def build_assets(out_dir: str | Path, config: AssetsConfig | None = None, *, force: bool = False,
                 prebuilt: str | Path | None = PREBUILT) -> Path:
    """Build (or reuse) the tokenizer, CLIP and VAE under `out_dir`; returns `out_dir` as a Path.

    A part is reused when its fingerprint matches assets.json and it loads; else it is copied from
    `prebuilt` when that folder holds the same part (portable fingerprint) and it loads; else it is
    built. `force` rebuilds all (no reuse, no prebuilt); `prebuilt=None` never copies.
    Quality gates are recorded, not enforced: see `gate_failures` (the CLI exits non-zero on them).
    """
    cfg = config or AssetsConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = part_fingerprints(cfg)
    portable = part_fingerprints(cfg, libraries=False)
    prebuilt = None if force or prebuilt is None or Path(prebuilt).resolve() == out.resolve() else Path(prebuilt)
    with _locked(out):
        parts = dict(read_manifest(out).get("parts", {}))
        for part in PARTS:
            old = parts.get(part, {})
            if not force and old.get("fingerprint") == fingerprints[part] and _loads(part, out / part):
                log.info("%s: reusing %s (fingerprint %s)", out, part, fingerprints[part])
                continue
            shipped = _prebuilt_part(part, portable[part], prebuilt) if prebuilt else None
            if shipped is not None:
                log.info("%s: copying the prebuilt %s from %s (built %s, portable fingerprint %s)", out, part,
                         prebuilt, shipped.get("built_at"), portable[part])
                _build_dir(out, part, _copy_part(prebuilt / part))
                parts[part] = {**shipped, "fingerprint": fingerprints[part], "copied_from": str(prebuilt)}
                _write_manifest(out, cfg, parts, fingerprints)
                continue
            log.info("%s: building %s", out, part)
            start, cpu = time.perf_counter(), time.process_time()
            quality = _build_dir(out, part, lambda folder, p=part: _BUILDERS[p](folder, cfg, out))
            parts[part] = {
                "fingerprint": fingerprints[part],
                "portable_fingerprint": portable[part],
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.perf_counter() - start, 2),
                "cpu_seconds": round(time.process_time() - cpu, 2),
                "quality": quality,
            }
            _write_manifest(out, cfg, parts, fingerprints)  # after each part: a crash keeps finished ones
        if out.resolve() != PREBUILT.resolve():  # the shipped set stays three parts
            _derive_parts(out)
        _write_manifest(out, cfg, parts, fingerprints)
    return out


# ---------------------------------------------------------------- CLI


def format_quality(manifest: dict, cfg: AssetsConfig) -> str:
    lines = [f"{'part':<6} {'metric':<62} {'value':>7} {'gate':>9}  ok"]
    for r in quality_rows(manifest, cfg):
        value = "missing" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"{r['part']:<6} {r['metric']:<62} {value:>7} {'>= ' + format(r['min'], 'g'):>9}  "
                     f"{'yes' if r['passed'] else 'NO'}")
    return "\n".join(lines)


@dataclasses.dataclass
class AssetsOptions:
    """How one `t2i-recap shapes assets` call builds (not part of the assets' fingerprint)."""

    out: str = ""
    """Folder to write (reused when nothing changed)."""
    force: bool = False
    """Rebuild every part even if the cache matches."""
    prebuilt: bool = True
    """Copy the matching parts shipped with the package (`--no-prebuilt`: never; build what is missing, ~15 min)."""


FLAGS = {"--seed": "seed"}
OPTIONS = {"--out": "out", "--force": "force", "--no-prebuilt": "prebuilt"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap shapes assets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, AssetsConfig, FLAGS,
                         config_help="YAML overriding AssetsConfig (e.g. configs/assets/shapes.yaml)")
    add_options(p, AssetsOptions, OPTIONS, required=("--out",))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    opts = options_from_args(AssetsOptions, args)
    try:
        cfg = config_from_args(AssetsConfig, args)
    except ConfigError as exc:
        print(f"t2i-recap shapes assets: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = build_assets(opts.out, cfg, force=opts.force, prebuilt=PREBUILT if opts.prebuilt else None)
    manifest = read_manifest(out)
    print(f"shapes assets in {out} ({time.perf_counter() - start:.1f}s, fingerprint {manifest['fingerprint']})")
    print(format_quality(manifest, cfg))
    failures = gate_failures(out, cfg)
    for failure in failures:
        print(f"quality gate failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
