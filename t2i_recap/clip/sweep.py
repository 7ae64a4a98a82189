"""`t2i-recap clip sweep --p 0,0.2,0.5,0.8,1.0 --out DIR`: the paper's CLIP mixing study (its Table 3)
at toy scale on the shapes world.

One CLIP per p (p = share of ORIGINAL captions per sample per step, the rest recaptions), each
scored by `t2i-recap eval retrieval` (image-to-text and text-to-image R@1/5/10, long-caption
retrieval, zero-shot classification of shape, colour and colour+shape, 95% bootstrap intervals),
then one table (report.md, report.json) and one figure (report.png: retrieval and classification
against p with interval bars).

Recaptions come from one of two sources, named in the report:
  --demo DIR   a `t2i-recap demo` output folder: its web shards and the recaption sidecars written
               by its trained captioner (the paper's setting: a learned captioner's recaptions);
  default      a fresh shapes world, every sample curated, its gold dense caption as the recaption
               (a perfect captioner) and its noisy alt-text as the original.

Stages are resumable (OUT/stages, t2i_recap/stages.py): a rerun skips finished ones, and an
interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError, from_dict, load_config, load_yaml, parse_override, save_config, to_dict
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.markdown import md_table, md_text
from t2i_recap.stages import Stage, StageRunner
from t2i_recap.sweep import best_p, fmt_ci, p_name, plot_against_p, run_command

log = get_logger(__name__)

# Seconds per CLIP step of batch 64 with shapes_tiny on a shared 2-core CPU with one torch thread
# (measured: 0.45 s; 0.12 s on idle cores with two threads, but 3-8 s with two threads on busy ones),
# and per retrieval evaluation of 100 pairs.
STEP_SECONDS = 0.45
EVAL_SECONDS = 15
RETRIEVAL = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
LONG = ("i2t_r1", "t2i_r1")


@dataclasses.dataclass
class ClipSweepConfig:
    """A CLIP mixing sweep; every field is also `--set key=value` (or a key of a --config YAML)."""

    p_values: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.2, 0.5, 0.8, 1.0])
    """Caption-mixing ratios: the share of ORIGINAL captions (1.0 = alt-texts only, 0.0 = recaptions only)."""
    recipe: str = "shapes_tiny"
    """The CLIP recipe: a shipped recipe's name (configs/clip/) or a YAML path."""
    steps: int = 600
    """Training steps per CLIP."""
    batch_size: int = 64
    """Pairs per step (the contrastive batch)."""
    lr: float | None = None
    """Learning rate (default: the recipe's)."""
    num_samples: int = 10_000
    """Shapes-world samples to make (gold source only)."""
    seed: int = 0
    """Seed of the shapes world, of training and of the bootstrap."""
    resolution: int = 32
    """Image side in pixels."""
    demo: str | None = None
    """A `t2i-recap demo` output folder whose web shards and captioner recaptions to train on."""
    retrieval_n: int = 100
    """Pairs in each retrieval task of the shapes retrieval suite (chance R@1 = 1 / n)."""
    threads: int = 1
    """Torch threads of each child command (OMP_NUM_THREADS, when not set already). One is the safe
    choice on a shared CPU: two threads on two busy cores ran a tiny CLIP's steps 10x slower."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """`section.key=value` overrides of the CLIP recipe (e.g. model.num_layers=4)."""

    def __post_init__(self) -> None:
        if not self.p_values or any(not 0.0 <= p <= 1.0 for p in self.p_values):
            raise ValueError(f"p_values must be a non-empty list of numbers in [0, 1], got {self.p_values}")
        if len(set(self.p_values)) != len(self.p_values):
            raise ValueError(f"p_values lists a value twice: {self.p_values}")
        for name in ("steps", "num_samples", "retrieval_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")
        if self.retrieval_n < 10:
            raise ValueError(f"retrieval_n must be >= 10 (R@10 needs ten candidates), got {self.retrieval_n}")


class ClipSweep:
    def __init__(self, cfg: ClipSweepConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.threads = cfg.threads

    # -- data -------------------------------------------------------------------------------------
    def data_paths(self) -> dict:
        """Shards, recaption folder and caption specs of the chosen recaption source."""
        if self.cfg.demo:
            demo = Path(self.cfg.demo)
            shards, sidecars = demo / "data" / "web", demo / "recaptions"
            if not sorted(shards.glob("*.tar")):
                raise SystemExit(f"clip sweep: --demo {demo}: no web shards in {shards} (run `t2i-recap demo` first)")
            if not sorted(sidecars.glob("*.parquet")):
                raise SystemExit(f"clip sweep: --demo {demo}: no recaption sidecars in {sidecars} (its recaption "
                                 "stage has not run)")
            return {"source": "captioner", "shards": str(shards), "recaption_dir": str(sidecars),
                    "original_caption": "txt", "recaption": "sidecar:re_caption",
                    "captioner": str(demo / "captioner")}
        return {"source": "gold", "shards": str(self.out / "data"), "recaption_dir": None,
                "original_caption": "txt", "recaption": "json:gold_caption"}

    def make_data(self) -> dict:
        paths = self.data_paths()
        if paths["source"] == "gold":
            from t2i_recap.shapes.make import make_dataset

            c = self.cfg
            make_dataset(paths["shards"], c.num_samples, c.seed, curated_fraction=1.0, resolution=c.resolution,
                         split="train", workers=1, progress=False)
        return paths

    # -- training and evaluation ------------------------------------------------------------------
    def base_config(self) -> Path:
        """The CLIP recipe with the sweep's data, size and steps filled in, as OUT/clip_base.yaml."""
        from t2i_recap.clip.config import ClipTrainConfig
        from t2i_recap.config_registry import resolve_config
        from t2i_recap.shapes.assets import PREBUILT

        c = self.cfg
        data = load_yaml(resolve_config(c.recipe, "clip"))
        paths = self.data_paths()
        data.setdefault("data", {}).update({k: paths[k] for k in ("shards", "recaption_dir", "original_caption",
                                                                   "recaption")}, resolution=c.resolution)
        model = data.setdefault("model", {})
        if not Path(model.get("tokenizer") or "").is_dir():  # the recipe's relative path, outside a checkout
            model["tokenizer"] = str(PREBUILT / "tokenizer")
        data.setdefault("trainer", {}).update(max_steps=c.steps, batch_size=c.batch_size, seed=c.seed)
        if c.lr is not None:
            data.setdefault("optim", {})["lr"] = c.lr
        for item in c.overrides:
            _merge(data, parse_override(item))
        data.setdefault("checkpoint", {})["every_steps"] = max(1, min(c.steps, 200))
        cfg = from_dict(ClipTrainConfig, data, f"{c.recipe} with the sweep's settings")
        path = self.out / "clip_base.yaml"
        save_config(cfg, path)
        return path

    def run_dir(self, p: float) -> Path:
        return self.out / "runs" / p_name(p)

    def train(self, p: float) -> dict:
        from t2i_recap.clip.config import ClipTrainConfig

        run_dir = self.run_dir(p)
        overrides = [f"mixing.p={p}", f"trainer.run_dir={run_dir}"]
        resume: list[str] = []
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            self._check_same_run(run_dir, load_config(ClipTrainConfig, self.out / "clip_base.yaml", overrides))
            resume = ["--resume", "latest"]
        argv = ["clip", "train", "--config", str(self.out / "clip_base.yaml")]
        for item in overrides:
            argv += ["--set", item]
        started = time.time()
        run_command(argv + resume, self.threads)
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return {"run": str(run_dir), "export": summary["export"], "mix_counts": summary["mix_counts"],
                "final_loss": summary["losses"][-1], "seconds": time.time() - started}

    @staticmethod
    def _check_same_run(run_dir: Path, cfg) -> None:
        """An interrupted run resumes only under the config it started with (a changed max_steps
        would bend its learning-rate schedule mid-run, so it counts as a change too)."""
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            return
        saved, wanted = load_yaml(saved_path), json.loads(json.dumps(to_dict(cfg)))
        changed = sorted(f"{s}.{k}" for s in wanted for k in wanted[s]
                         if isinstance(wanted[s], dict) and saved.get(s, {}).get(k) != wanted[s][k])
        if changed:
            raise SystemExit(f"clip sweep: {run_dir} holds a run with other settings ({', '.join(changed)}); "
                             "remove that folder or pick another --out")

    def evaluate(self, p: float) -> dict:
        run_dir = self.run_dir(p)
        run_command(["eval", "retrieval", "--model", str(run_dir / "export"), "--suite", "shapes",
                     "--out", str(run_dir / "retrieval"), "--resolution", str(self.cfg.resolution),
                     "--n", str(self.cfg.retrieval_n), "--seed", str(self.cfg.seed)], self.threads)
        return {"report": str(run_dir / "retrieval" / "report.json")}

    def report(self) -> dict:
        reports = {p: json.loads((self.run_dir(p) / "retrieval" / "report.json").read_text(encoding="utf-8"))
                   for p in self.cfg.p_values}
        data = self.data_paths()
        stage_seconds = {}
        for marker in sorted((self.out / "stages").glob("*.json")):
            stage_seconds[marker.stem] = round(json.loads(marker.read_text())["seconds"], 1)
        result = build_result(reports, data, to_dict(self.cfg), stage_seconds)
        atomic_write_text(self.out / "report.json", json.dumps(result, indent=1))
        atomic_write_text(self.out / "report.md", render_markdown(result))
        plot_result(result, self.out / "report.png")
        return {"report": str(self.out / "report.md"), "figure": str(self.out / "report.png")}

    # -- wiring -----------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        c = dataclasses.asdict(self.cfg)
        data = {k: c[k] for k in ("demo", "num_samples", "seed", "resolution")}
        train = {k: c[k] for k in ("recipe", "steps", "batch_size", "lr", "seed", "resolution", "overrides")}
        step_s = STEP_SECONDS * self.cfg.batch_size / 64
        stages = [Stage("data", self.make_data, data, 0.0004 * self.cfg.num_samples + 2 if not self.cfg.demo else 1)]
        for p in self.cfg.p_values:
            name = p_name(p)
            stages.append(Stage(f"train_{name}", lambda p=p: self.train(p), {"p": p, **train},
                                self.cfg.steps * step_s + 15, ("data",)))
            stages.append(Stage(f"eval_{name}", lambda p=p: self.evaluate(p),
                                {"p": p, "n": c["retrieval_n"], "seed": c["seed"]},
                                EVAL_SECONDS * self.cfg.retrieval_n / 100, (f"train_{name}",)))
        return stages

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "sweep_config.yaml")
        stages = self.stages()
        self.data_paths()  # a bad --demo fails before anything runs
        from t2i_recap.extras import require

        require("matplotlib", "caption", "the sweep's figure")  # ... and so does a missing plotting library
        eta = sum(s.expected_seconds for s in stages)
        log.info("clip sweep: %d CLIPs (p = %s), %d steps each; expected about %.0f min on 2 CPU cores",
                 len(self.cfg.p_values), ", ".join(f"{p:g}" for p in self.cfg.p_values), self.cfg.steps, eta / 60)
        self.base_config()
        summaries = StageRunner(self.out).run_all(stages, workers=1)
        return summaries | {"report": self.report()}  # always rewritten: cheap, and it reads every stage


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


# ---- the table and the figure ---------------------------------------------------------------

def build_result(reports: dict[float, dict], data: dict, config: dict, stage_seconds: dict) -> dict:
    """Every p's metrics, read from its `eval retrieval` report, and which p is best for each."""
    rows = []
    for p in sorted(reports):
        m = reports[p]["metrics"]
        rows.append({"p": p, "model_sha256": reports[p]["model"]["sha256"],
                     "retrieval": {k: m["retrieval"][k] for k in RETRIEVAL},
                     "long": {k: m["long"][k] for k in LONG if k in m.get("long", {})},
                     "classification": {k: {"mean": v["mean"], "ci": v["ci"], "n": v["n"], "chance": v["chance"]}
                                        for k, v in m["classification"].items()},
                     "chance_r1": m["chance_r1"]})
    best = {}
    for task in ("retrieval", "long", "classification"):
        for key in dict.fromkeys(k for r in rows for k in r[task]):
            best[f"{task}.{key}"] = best_p([(r["p"], r[task].get(key)) for r in rows])
    suites = {r["suite"]["sha256"] for r in reports.values()}
    return {"kind": "t2i-recap clip sweep", "recaptions": data, "config": config, "rows": rows, "best_p": best,
            "same_suite": len(suites) == 1, "suite": next(iter(reports.values()))["suite"],
            "stage_seconds": stage_seconds}


def _source_line(data: dict) -> str:
    if data["source"] == "captioner":
        return (f"Recaptions: written by the trained captioner {md_text(data['captioner'])} (sidecars "
                f"{md_text(data['recaption_dir'])}); originals: the web alt-texts of {md_text(data['shards'])}.")
    return ("Recaptions: the shapes world's gold dense captions (a perfect captioner; no trained captioner was "
            f"given); originals: its noisy alt-texts ({md_text(data['shards'])}).")


def render_markdown(result: dict) -> str:
    c = result["config"]
    lines = ["# CLIP caption-mixing sweep (the paper's Table 3 at toy scale)", "",
             _source_line(result["recaptions"]), "",
             f"One CLIP per p ({md_text(c['recipe'])}, {c['steps']} steps of {c['batch_size']} pairs, seed {c['seed']}); "
             f"p = share of ORIGINAL captions. Mean [95% bootstrap CI over items]; retrieval over "
             f"{c['retrieval_n']} pairs (chance R@1 {result['rows'][0]['chance_r1']:.3f}).", "",
             "## Retrieval (image-to-text, text-to-image; long: 3-4-object scenes)", ""]
    heads = ["p"] + [k.replace("_r", " R@") for k in RETRIEVAL] + [f"long {k.replace('_r', ' R@')}" for k in LONG]
    rows = [[f"{r['p']:g}"] + [fmt_ci(r["retrieval"].get(k)) for k in RETRIEVAL]
            + [fmt_ci(r["long"].get(k)) for k in LONG] for r in result["rows"]]
    lines += md_table(heads, rows)
    sets = list(dict.fromkeys(k for r in result["rows"] for k in r["classification"]))
    lines += ["", "## Zero-shot classification (accuracy)", ""]
    chance = {k: next(r["classification"][k]["chance"] for r in result["rows"] if k in r["classification"])
              for k in sets}
    lines += md_table(["p"] + [f"{k} (chance {chance[k]:.3f})" for k in sets],
                      [[f"{r['p']:g}"] + [fmt_ci(r["classification"].get(k)) for k in sets] for r in result["rows"]])
    lines += ["", "## Best p per metric (highest mean; intervals above say whether the gap is real)", ""]
    lines += [f"- {k}: p = {v:g}" for k, v in result["best_p"].items() if v is not None]
    if not result["same_suite"]:
        lines += ["", "Warning: the runs were scored on different suites."]
    lines += ["", "Figure: report.png. Stage seconds: "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


def plot_result(result: dict, path: Path) -> Path:
    rows = result["rows"]

    def series(task: str, keys, label) -> dict:
        return {label(k): [(r["p"], r[task].get(k)) for r in rows] for k in keys}

    retrieval = series("retrieval", ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"), lambda k: k.replace("_r", " R@"))
    retrieval |= series("long", LONG, lambda k: "long " + k.replace("_r", " R@"))
    sets = list(dict.fromkeys(k for r in rows for k in r["classification"]))
    classification = series("classification", sets, lambda k: k)
    return plot_against_p([("Retrieval", retrieval), ("Zero-shot classification", classification)], path,
                          f"CLIP caption-mixing sweep ({result['recaptions']['source']} recaptions)")


# ---- CLI ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ClipSweepOptions:
    """Where one `t2i-recap clip sweep` call writes (not part of sweep_config.yaml's settings)."""

    out: str = ""
    """Output folder: data, one run per p, report.md/json/png (rerun to resume)."""


FLAGS = {"--p": "p_values", "--steps": "steps", "--demo": "demo", "--clip-set": "overrides"}
OPTIONS = {"--out": "out"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-recap clip sweep", description=__doc__.split("\n")[0])
    add_config_arguments(ap, ClipSweepConfig, FLAGS)
    add_options(ap, ClipSweepOptions, OPTIONS, required=("--out",))
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(ClipSweepConfig, args)
    except ConfigError as exc:
        parser.error(str(exc))
    out = Path(options_from_args(ClipSweepOptions, args).out)
    ClipSweep(cfg, out).run()
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"figure: {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
