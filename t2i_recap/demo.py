"""`t2i-recap demo`: the paper's finding end to end on the shapes world, in one command.

Stages (each resumable; a rerun skips finished ones, see t2i_recap/stages.py):
  world      web shards with noisy alt-texts (a curated share with gold captions) + a held-out test set
  assets     the tiny tokenizer, CLIP and VAE (copied from the package's prebuilt set, or built)
  captioner  fine-tune the tiny LLaVA captioner on the curated subset only
  fidelity   caption the held-out test set and parse it back: the captioner's scene-graph accuracy
  recaption  recaption every web sample with the trained captioner (never the gold captions)
  stats      caption statistics, original vs recaption
  prepare    the feature cache: VAE latents + text embeddings of both captions (shared by all p)
  train_pX   the tiny DiT at caption-mixing ratio p (p = share of ORIGINAL captions), exported
  eval_pX    the shapes suite on each model, raw and recaptioned prompts
  compare    the paper's Table 7 at toy scale, with bootstrap confidence intervals
The train_pX, eval_pX and stats stages run as child processes, `workers` of them at once (one per
core on a 2-core box), each with an equal share of the cores as its torch threads; recaption splits
the web shards over `workers` captioning processes (RANK / WORLD_SIZE, as `accelerate launch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError, from_dict, load_yaml, save_config
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.stages import Stage, StageRunner

log = get_logger(__name__)


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the toy reproduction; `--quick` swaps in QUICK below."""

    num_web: int = 20_000
    """Web samples (noisy alt-texts); the DataComp analogue."""
    curated_fraction: float = 0.05
    """Share of web samples that also carry a gold dense caption (the captioner's training set)."""
    gold_captions: int = 5
    """Gold wordings per curated sample (COCO-style, 5 per image): the captioner's pairs."""
    num_test: int = 500
    """Held-out scenes for the captioner's fidelity."""
    seed: int = 0
    resolution: int = 32
    p_values: list[float] = dataclasses.field(default_factory=lambda: [1.0, 0.0])
    """Caption-mixing ratios to train: p = 1.0 is the alt-text baseline, p = 0.0 recaptions only."""
    train_steps: int = 2000
    train_batch_size: int = 32
    train_lr: float = 2e-3
    """The DiT's learning rate (batch 32 x 2,000 steps, p = 0 on an earlier demo's recaptions: 2e-3 reached 0.459
    recaptioned-prompt alignment, 1e-3 0.415)."""
    train_config: str = "shapes_tiny"
    """Training recipe: a shipped recipe's name (configs/train/) or a YAML path."""
    finetune_config: str = "finetune_shapes_demo"
    """Captioner fine-tuning recipe: a shipped recipe's name (configs/caption/) or a YAML path."""
    finetune_overrides: list[str] = dataclasses.field(default_factory=list)
    caption_batch_size: int = 256
    caption_max_new_tokens: int = 96
    eval_per_category: int = 16
    eval_images_per_prompt: int = 2
    eval_steps: int = 20
    workers: int = 2
    """Processes for making the shards, and how many train/eval stages run side by side."""
    assets: str | None = None
    """An existing assets folder (`t2i-recap shapes assets`) to use instead of making one under --out."""
    assets_overrides: list[str] = dataclasses.field(default_factory=list)
    """`--set`-style overrides of AssetsConfig when the demo makes the assets (e.g. clip.steps=50)."""
    prebuilt_assets: bool = True
    """Copy the package's prebuilt tokenizer, CLIP and VAE when they match the settings (seconds);
    false builds them here (~15 min on 2 cores)."""

    sweep_p_values: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.2, 0.5, 1.0])
    """`--sweep`: the caption-mixing ratios of the curve."""
    sweep_seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """`--sweep`: training seeds per p (the first, if it is `seed`, shares the default demo's runs)."""
    sweep_t5: bool = True
    """`--sweep`: also train T5-conditioned DiTs at p = 0, one per seed (t2i_recap/demo_sweep.py)."""
    first_sentence_weight: float | None = None
    """Train one more p = 0 DiT whose captions are the recaption (weight 1 - W) and its first sentence
    (`first_sentence:recaption`, weight W), and add its row to the demo's table; None = not trained."""
    short_caption_weight: float | None = None
    """With first_sentence_weight: that run also trains on a short caption derived from the recaption
    (`SHORT_CAPTION:recaption`, weight V; the recaption then weighs 1 - W - V), the kind of caption
    raw prompts are; None = not used."""
    short_caption: str = "short"
    """The derived caption of short_caption_weight: `short` (no positions, and for most captions no
    colours, no sizes or neither), `no_positions`, `listing` (the things the first sentence names,
    then like `short`), `lead` (the first one or two of them) or `first_things` (the lead with every
    colour and size kept) (t2i_recap/caption_specs.py)."""

    def __post_init__(self) -> None:
        if not self.p_values or any(not 0.0 <= p <= 1.0 for p in self.p_values):
            raise ValueError(f"p_values must be a non-empty list of numbers in [0, 1], got {self.p_values}")
        if not self.sweep_p_values or any(not 0.0 <= p <= 1.0 for p in self.sweep_p_values):
            raise ValueError(f"sweep_p_values must be a non-empty list of numbers in [0, 1], got {self.sweep_p_values}")
        if not self.sweep_seeds or len(set(self.sweep_seeds)) != len(self.sweep_seeds):
            raise ValueError(f"sweep_seeds must be a non-empty list of distinct seeds, got {self.sweep_seeds}")
        if self.first_sentence_weight is not None and not 0.0 < self.first_sentence_weight <= 1.0:
            raise ValueError(f"first_sentence_weight must be in (0, 1], got {self.first_sentence_weight}")
        if self.short_caption not in SHORT_CAPTIONS:
            raise ValueError(f"short_caption must be one of {', '.join(SHORT_CAPTIONS)}, got {self.short_caption!r}")
        if self.short_caption_weight is not None:
            if self.first_sentence_weight is None:
                raise ValueError("short_caption_weight is a caption of the first-sentence run: set first_sentence_weight too")
            if not 0.0 < self.short_caption_weight < 1.0 or self.first_sentence_weight + self.short_caption_weight > 1.0:
                raise ValueError(f"short_caption_weight must be in (0, 1) with first_sentence_weight + short_caption_weight "
                                 f"<= 1, got {self.short_caption_weight} beside {self.first_sentence_weight}")


SHORT_CAPTIONS = {"short": "short", "no_positions": "nopos", "lead": "lead", "listing": "list", "first_things": "things"}
"""The derived captions short_caption may name, with their tag in the run's name."""

QUICK = dict(num_web=240, num_test=24, curated_fraction=0.25, train_steps=30, train_batch_size=16,
             caption_batch_size=32, caption_max_new_tokens=48, eval_per_category=2, eval_images_per_prompt=1,
             eval_steps=4, finetune_overrides=["train.max_steps=20"])
# `--sweep --quick`: the orchestration at its smallest (the QUICK sizes, one seed, two p values).
QUICK_SWEEP = dict(sweep_p_values=[0.0, 1.0], sweep_seeds=[0])


def _call(main, argv: list[str]) -> None:
    """Run a command's main(argv) in-process; a non-zero exit stops the pipeline, naming the command."""
    command = f"{main.__module__} {' '.join(argv)}"
    log.info("$ python -m %s", command)
    code = main(argv)
    if code:
        raise SystemExit(f"demo: `{command}` failed with exit code {code}")


def _spawn(argv: list[str], threads: int, ranks: int = 1) -> None:
    """Run `python -m t2i_recap ARGV...` in a child process with `threads` torch threads (unless
    OMP_NUM_THREADS is set already); a non-zero exit stops the pipeline, naming the command.
    `ranks` > 1 starts that many copies side by side with RANK / WORLD_SIZE set (commands that
    split their work by rank without talking to each other, like `caption run`)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    log.info("$ t2i-recap %s  (OMP_NUM_THREADS=%s%s)", " ".join(argv), env["OMP_NUM_THREADS"],
             f", {ranks} ranks" if ranks > 1 else "")
    rank_env = [{} if ranks == 1 else {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks)}
                for r in range(ranks)]
    children = [subprocess.Popen([sys.executable, "-m", "t2i_recap", *argv], env={**env, **extra})
                for extra in rank_env]
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(f"demo: `t2i-recap {' '.join(argv)}` failed with exit codes {codes}")


def _p_name(p: float) -> str:
    return f"p{p:.2f}".replace(".", "_")


_TRAIN_KEYS = ("train_steps", "train_batch_size", "train_lr", "train_config")
_EVAL_KEYS = ("eval_per_category", "eval_images_per_prompt", "eval_steps")


class Demo:
    def __init__(self, cfg: DemoConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.web, self.test = out / "data" / "web", out / "data" / "test"
        self.assets = Path(cfg.assets) if cfg.assets else out / "assets"
        self.captioner = out / "captioner"
        self.recaptions = out / "recaptions"

    # -- stages ------------------------------------------------------------------------------
    def world(self) -> dict:
        from t2i_recap.shapes.make import make_dataset

        c = self.cfg
        web = make_dataset(self.web, c.num_web, c.seed, curated_fraction=c.curated_fraction,
                           resolution=c.resolution, split="train", workers=c.workers, gold_captions=c.gold_captions)
        test = make_dataset(self.test, c.num_test, c.seed, curated_fraction=1.0, resolution=c.resolution,
                            split="test", workers=1, shard_size=max(c.num_test, 1))
        return {"web": web, "test": test}

    def build_assets(self) -> dict:
        from t2i_recap.config import load_config
        from t2i_recap.shapes.assets import AssetsConfig, build_assets

        if self.cfg.assets:  # given by the user: used as it is, never rebuilt in their folder
            missing = [p for p in ("clip", "vae", "tokenizer", "assets.json") if not (self.assets / p).exists()]
            if missing:
                raise SystemExit(f"demo: assets folder {self.assets} lacks {', '.join(missing)}; "
                                 "build it with `t2i-recap shapes assets --out DIR`")
        else:
            from t2i_recap.shapes.assets import PREBUILT

            build_assets(self.assets, load_config(AssetsConfig, None, self.cfg.assets_overrides),
                         prebuilt=PREBUILT if self.cfg.prebuilt_assets else None)
        manifest = json.loads((self.assets / "assets.json").read_text())
        return {part: info.get("quality") for part, info in manifest.get("parts", {}).items()}

    def _assets_seconds(self) -> float:
        """Expected time: seconds to copy the prebuilt parts; ~0.37 s per CLIP or VAE step to build
        (927 s for 1,500 + 1,000 on a busy 2-core box)."""
        from t2i_recap.config import load_config
        from t2i_recap.shapes.assets import AssetsConfig

        cfg = load_config(AssetsConfig, None, self.cfg.assets_overrides)
        if self.cfg.prebuilt_assets and not self.cfg.assets_overrides:
            return 10
        return 0.37 * (cfg.clip.steps + cfg.vae.steps) + 10

    def finetune(self) -> dict:
        from t2i_recap.captioner import finetune

        argv = ["--config", self.cfg.finetune_config, "--shards", str(self.web), "--clip",
                str(self.assets / "clip"), "--out", str(self.captioner)]
        for item in self.cfg.finetune_overrides:
            argv += ["--set", item]
        _call(finetune.main, argv)
        return {"captioner": str(self.captioner)}

    def fidelity(self) -> dict:
        from t2i_recap.captioner import fidelity

        out = self.out / "fidelity"
        _call(fidelity.main, ["--model", str(self.captioner), "--shards", str(self.test), "--out", str(out),
                              "--batch-size", str(self.cfg.caption_batch_size),
                              "--max-new-tokens", str(self.cfg.caption_max_new_tokens)])
        return json.loads((out / "fidelity.json").read_text())

    def recaption(self) -> dict:
        """Every web shard, split over `workers` captioning processes (one core each)."""
        ranks = max(1, min(self.cfg.workers, os.cpu_count() or 1))
        _spawn(["caption", "run", "--input", str(self.web), "--out", str(self.recaptions), "--model",
                str(self.captioner), "--prompt", "recap", "--batch-size", str(self.cfg.caption_batch_size),
                "--max-new-tokens", str(self.cfg.caption_max_new_tokens)],
               threads=max(1, (os.cpu_count() or 1) // ranks), ranks=ranks)
        return {"sidecars": str(self.recaptions)}

    def stats(self) -> dict:
        out = self.out / "caption_stats"
        _spawn(["caption", "stats", "--sidecars", str(self.recaptions), "--out", str(out), "--clip",
                str(self.assets / "clip")], self._threads())
        return {"stats": str(out / "stats.json")}

    def _text_encoder_dir(self) -> Path:
        """The CLIP's text tower as its own CLIPTextModel folder; a user's assets folder from before
        that folder existed gives its whole CLIPModel (it loads too, with a report of unused keys)."""
        text = self.assets / "clip_text"
        return text if (text / "config.json").is_file() else self.assets / "clip"

    def train_config(self) -> Path:
        """The demo's training YAML: the shapes recipe with this run's paths filled in."""
        from t2i_recap.train_config import TrainConfig

        from t2i_recap.config_registry import resolve_config

        data = load_yaml(resolve_config(self.cfg.train_config, "train"))
        data.setdefault("data", {}).update(shards=str(self.web), recaption_dir=str(self.recaptions),
                                           resolution=self.cfg.resolution)
        data.setdefault("text_encoder", {})["name_or_path"] = str(self._text_encoder_dir())
        data.setdefault("features", {}).update(vae=str(self.assets / "vae"), cache_dir=str(self.out / "features"))
        data.setdefault("trainer", {}).update(max_steps=self.cfg.train_steps, batch_size=self.cfg.train_batch_size,
                                              micro_batch_size=self.cfg.train_batch_size, seed=self.cfg.seed)
        data.setdefault("optim", {})["lr"] = self.cfg.train_lr
        cfg = from_dict(TrainConfig, data, self.cfg.train_config)
        path = self.out / "train_base.yaml"
        save_config(cfg, path)
        return path

    def prepare(self) -> dict:
        from t2i_recap import prepare

        _call(prepare.main, ["--config", str(self.train_config())])
        return {"cache": str(self.out / "features"), "train_config": str(self.out / "train_base.yaml")}

    def _threads(self) -> int:
        """Torch threads for each child stage: the cores shared by the stages that run at once."""
        side_by_side = max(1, min(self.cfg.workers, len(self.cfg.p_values)))
        return max(1, (os.cpu_count() or 1) // side_by_side)

    def train(self, p: float, config: Path, name: str | None = None, seed: int | None = None) -> dict:
        run_dir = self.out / "runs" / (name or _p_name(p))
        overrides = ["--set", f"mixing.p={p}", "--set", f"trainer.run_dir={run_dir}"]
        if seed is not None:
            overrides += ["--set", f"trainer.seed={seed}"]
        resume = ["--resume", "latest"] if (run_dir / "checkpoints").exists() else []
        _spawn(["train", "--config", str(config), *overrides, *resume], self._threads())
        _spawn(["export", "--run", str(run_dir), "--out", str(run_dir / "export"), "--overwrite"], self._threads())
        return {"run": str(run_dir), "export": str(run_dir / "export")}

    def evaluate(self, p: float, name: str | None = None) -> dict:
        run_dir = self.out / "runs" / (name or _p_name(p))
        c = self.cfg
        _spawn(["eval", "run", "--model", str(run_dir / "export"), "--suite", "shapes", "--out", str(run_dir / "eval"),
                "--clip", str(self.assets / "clip"), "--recaption", str(self.captioner),
                "--per-category", str(c.eval_per_category), "--images-per-prompt", str(c.eval_images_per_prompt),
                "--steps", str(c.eval_steps), "--seed", str(c.seed)], self._threads())
        return {"report": str(run_dir / "eval" / "report.json")}

    # -- the first-sentence run (data.captions / mixing.weights) --------------------------------
    def first_sentence_name(self) -> str:
        v = self.cfg.short_caption_weight
        tag = SHORT_CAPTIONS[self.cfg.short_caption]
        name = f"{_p_name(0.0)}_first{self.cfg.first_sentence_weight:.2f}" + (f"_{tag}{v:.2f}" if v else "")
        return name.replace(".", "_")

    def _first_sentence_files(self) -> tuple[Path, Path]:
        """The run's train config and feature cache (first sentence only: the names they always had)."""
        if self.cfg.short_caption_weight is None:
            return self.out / "train_first_sentence.yaml", self.out / "features_first_sentence"
        name = self.first_sentence_name()
        return self.out / f"train_{name}.yaml", self.out / f"features_{name}"

    def first_sentence_config(self) -> Path:
        """train_first_sentence.yaml: train_base.yaml plus the derived caption `first_sentence` (the
        recaption's first sentence) at weight W beside the recaption at 1 - W, with its own feature
        cache (it holds the extra caption's embeddings); with short_caption_weight V also
        `SHORT_CAPTION:recaption` at V (the recaption at 1 - W - V), in files named after the run."""
        from t2i_recap.train_config import TrainConfig

        w, v, kind = self.cfg.first_sentence_weight, self.cfg.short_caption_weight, self.cfg.short_caption
        path, cache = self._first_sentence_files()
        data = load_yaml(self.out / "train_base.yaml")
        captions = {"first_sentence": "first_sentence:recaption"}
        weights = {"recaption": 1.0 - w - (v or 0.0), "first_sentence": w}
        if v is not None:
            captions[kind] = f"{kind}:recaption"
            weights[kind] = v
        data.setdefault("data", {})["captions"] = captions
        data.setdefault("mixing", {})["weights"] = weights
        data.setdefault("features", {})["cache_dir"] = str(cache)
        save_config(from_dict(TrainConfig, data, str(path)), path)
        return path

    def prepare_first_sentence(self) -> dict:
        path = self.first_sentence_config()
        _spawn(["prepare", "--config", str(path)], max(1, os.cpu_count() or 1))
        return {"train_config": str(path), "cache": str(self._first_sentence_files()[1])}

    def compare(self) -> dict:
        from t2i_recap.evaluate import compare

        runs = [str(self.out / "runs" / _p_name(p) / "eval") for p in self.cfg.p_values]
        labels = ",".join(f"p={p:g}" for p in self.cfg.p_values)
        if self.cfg.first_sentence_weight is not None:
            runs.append(str(self.out / "runs" / self.first_sentence_name() / "eval"))
            labels += f",p=0 + first sentence {self.cfg.first_sentence_weight:g}"
            if self.cfg.short_caption_weight is not None:
                labels += f" + {self.cfg.short_caption.replace('_', ' ')} {self.cfg.short_caption_weight:g}"
        _call(compare.main, [*runs, "--out", str(self.out / "report"), "--labels", labels])
        return {"report": str(self.out / "report")}

    # -- wiring ------------------------------------------------------------------------------
    def _settings(self, *keys: str) -> dict:
        c = dataclasses.asdict(self.cfg)
        return {k: c[k] for k in keys}

    def prepare_seconds(self) -> float:
        return 50 * self.cfg.num_web / 20_000 + 5

    def shared_stages(self) -> list[Stage]:
        """world .. prepare: what every trained model shares."""
        c = dataclasses.asdict(self.cfg)
        world = {k: c[k] for k in ("num_web", "curated_fraction", "gold_captions", "num_test", "seed", "resolution")}
        caption = {k: c[k] for k in ("caption_batch_size", "caption_max_new_tokens")}
        train = self._settings(*_TRAIN_KEYS)
        # Expected seconds for the ETA bar, from the full run of 2026-11-26 on 2 CPU cores (docs/results.md).
        scale = c["num_web"] / 20_000
        pairs = c["num_web"] * c["curated_fraction"] * c["gold_captions"] / 5_000
        return [
            Stage("world", self.world, world, 10 * scale + 5),
            Stage("assets", self.build_assets, {"assets": c["assets"], "o": c["assets_overrides"],
                                                "prebuilt": c["prebuilt_assets"]},
                  5 if c["assets"] else self._assets_seconds()),
            Stage("captioner", self.finetune, {"config": c["finetune_config"], "o": c["finetune_overrides"]},
                  180 * pairs + 10,
                  ("world", "assets")),
            Stage("fidelity", self.fidelity, caption, 20, ("captioner",)),
            Stage("recaption", self.recaption, caption, 115 * scale + 5, ("captioner",)),
            Stage("prepare", self.prepare, train, self.prepare_seconds(), ("recaption",)),
        ]

    def run_stages(self, p: float, name: str | None = None, seed: int | None = None, config: Path | None = None,
                   depends: str = "prepare", settings: dict | None = None) -> list[Stage]:
        """Train (and export) one DiT at p, then evaluate it. The defaults are the demo's own run at p;
        `name`, `seed`, `config` and `settings` make another (the sweep's other seeds and encoders)."""
        name = name or _p_name(p)
        # train_base.yaml is written once by `prepare`, so stages running side by side never rewrite it.
        config = config or self.out / "train_base.yaml"
        extra = settings or {}
        return [Stage(f"train_{name}", lambda: self.train(p, config, name, seed),
                      {"p": p, **self._settings(*_TRAIN_KEYS), **extra},
                      self.cfg.train_steps * 0.25 * self.cfg.train_batch_size / 32, (depends,), isolated=True),
                Stage(f"eval_{name}", lambda: self.evaluate(p, name), {"p": p, **self._settings(*_EVAL_KEYS), **extra},
                      60, (f"train_{name}", "captioner"), isolated=True)]

    def stats_stage(self) -> Stage:
        # Nothing waits for the statistics: they take the first free core (beside a DiT's training).
        return Stage("stats", self.stats, {}, 40 * self.cfg.num_web / 20_000 + 5, ("recaption",), isolated=True)

    def stages(self) -> list[Stage]:
        stages = self.shared_stages()
        for p in self.cfg.p_values:
            stages += self.run_stages(p)
        evals = [f"eval_{_p_name(p)}" for p in self.cfg.p_values]
        compare_settings: dict = {"p": self.cfg.p_values}
        w = self.cfg.first_sentence_weight
        if w is not None:
            name = self.first_sentence_name()
            v = self.cfg.short_caption_weight
            short = {"short_caption_weight": v, "short_caption": self.cfg.short_caption} if v is not None else {}
            extra = {"first_sentence_weight": w, **short}
            prepare = "prepare_first_sentence" if v is None else f"prepare_{name}"
            stages.append(Stage(prepare, self.prepare_first_sentence, {"w": w, **short},
                                self.prepare_seconds(), ("prepare",)))
            stages += self.run_stages(0.0, name=name, config=self._first_sentence_files()[0],
                                      depends=prepare, settings=extra)
            evals.append(f"eval_{name}")
            compare_settings.update(extra)
        stages.append(self.stats_stage())
        stages.append(Stage("compare", self.compare, compare_settings, 5, tuple(evals)))
        return stages


_DENSE_CELLS = (("oracle_objects_exact", "dense exact"), ("oracle_objects", "dense objects"))


def _fmt_ci(value: dict) -> str:
    low, high = value["ci"]
    return f"{value['mean']:.3f} [{low:.3f}, {high:.3f}]"


def summarize(out: Path, metric: str = "oracle_geneval") -> str:
    """The closing summary: each run's overall oracle alignment with its 95% bootstrap CI."""
    path = out / "report" / "compare.json"
    if not path.exists():
        return f"no comparison report at {path}"
    data = json.loads(path.read_text())
    lines = ["", f"Overall shapes-oracle alignment ({metric}; mean [95% bootstrap CI over prompts]); dense prompts "
             "exactly right, and the share of their objects found:"]
    for row in data["rows"]:
        cells = []
        for variant, cell in row["variants"].items():
            value = cell.get(metric) or {}
            if value.get("mean") is not None:
                dense = "".join(f", {name} {_fmt_ci(cell[key])}" for key, name in _DENSE_CELLS
                                if (cell.get(key) or {}).get("mean") is not None)
                cells.append(f"{variant} prompts {_fmt_ci(value)}{dense}")
        lines.append(f"  {row['label']:>8}: " + "; ".join(cells))
    lines.append(f"Report: {out / 'report' / 'compare.html'} (also compare.md, compare.json)")
    return "\n".join(lines)


@dataclasses.dataclass
class DemoOptions:
    """Where one `t2i-recap demo` call writes, and at what size (not part of demo_config.yaml)."""

    out: str = "runs/demo"
    """Output folder (rerun to resume)."""
    quick: bool = False
    """A smoke-sized run (a few minutes): the QUICK sizes, under --config / --set."""
    sweep: bool = False
    """The caption-mixing curve instead: DiTs at sweep_p_values x sweep_seeds plus T5-conditioned ones
    (hours on 2 CPU cores; the ETA is logged first). With --quick: one seed, two p values."""


FLAGS = {"--p": "p_values"}
OPTIONS = {"--out": "out", "--quick": "quick", "--sweep": "sweep"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i-recap demo", description=__doc__.split("\n")[0])
    add_config_arguments(parser, DemoConfig, FLAGS)
    add_options(parser, DemoOptions, OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = options_from_args(DemoOptions, ns)
    setup_logging()
    try:
        base = {**(QUICK if args.quick else {}), **(QUICK_SWEEP if args.quick and args.sweep else {})}
        cfg = config_from_args(DemoConfig, ns, base=base or None)
    except ConfigError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    if args.sweep:
        return _run_sweep(cfg, out)
    StageRunner(out).run_all(Demo(cfg, out).stages(), workers=cfg.workers)
    print(summarize(out))
    return 0


def _run_sweep(cfg: DemoConfig, out: Path) -> int:
    from t2i_recap import demo_sweep

    stages = demo_sweep.sweep_stages(Demo(cfg, out))
    runs = demo_sweep.plan(cfg)
    eta = demo_sweep.expected_seconds(stages, cfg.workers)
    message = (f"demo --sweep: {len(runs)} DiTs ({len(cfg.sweep_p_values)} p values x {len(cfg.sweep_seeds)} seed(s)"
               f"{' + T5 at p = 0' if cfg.sweep_t5 else ''}), expected about {eta / 60:.0f} min on 2 CPU cores "
               "(finished stages are skipped)")
    log.info(message)
    print(message, flush=True)
    StageRunner(out).run_all(stages, workers=cfg.workers)
    print((out / "sweep" / "sweep.md").read_text(encoding="utf-8"))
    print(f"Figure: {out / 'sweep' / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
