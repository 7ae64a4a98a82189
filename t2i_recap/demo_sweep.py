"""`t2i-recap demo --sweep`: the paper's Table 7 as a curve on the shapes world.

DiTs at every p of `sweep_p_values` (p = share of ORIGINAL captions) and every seed of
`sweep_seeds`, on the demo's own captioner recaptions, plus (with `sweep_t5`) DiTs conditioned on a
T5 encoder instead of the CLIP text tower at p = 0; each evaluated with `eval run` on raw and
recaptioned prompts. The report (OUT/sweep/sweep.md, sweep.json, sweep.png) gives, per text encoder
and p, the shapes-oracle alignment (GenEval-style mean over categories) pooled over seeds: each
prompt's accuracy is averaged over the seeds' models, then bootstrapped over prompts within
categories (95%); every seed's own score is listed beside it.

The T5 encoder is T5-shaped but untrained (random weights from the sweep's seed, frozen, with the
shapes tokenizer): there is no pretrained T5 for the shapes world, so the comparison is a
contrastively trained text tower against an encoder that only keeps the words apart.

Runs of the first seed at the demo's own p values are the default demo's runs (same stage, same
folder), so a sweep after a demo (or a demo after a sweep) trains them once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from t2i_recap.config import from_dict, load_yaml, save_config
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger
from t2i_recap.markdown import md_table
from t2i_recap.stages import Stage
from t2i_recap.sweep import fmt_ci, p_name, plot_against_p, run_command

log = get_logger(__name__)
N_BOOT = 1000
VARIANTS = ("raw", "recap")
T5_SIZE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


def run_name(encoder: str, p: float, seed: int, base_seed: int) -> str:
    """The run folder's name: the default demo's own name for the CLIP runs of its seed."""
    if encoder == "clip" and seed == base_seed:
        return p_name(p)
    return f"{'t5_' if encoder == 't5' else ''}{p_name(p)}_s{seed}"


def plan(cfg) -> list[tuple[str, float, int]]:
    """(encoder, p, seed) of every DiT the sweep trains."""
    runs = [("clip", p, s) for p in cfg.sweep_p_values for s in cfg.sweep_seeds]
    if cfg.sweep_t5:
        runs += [("t5", 0.0, s) for s in cfg.sweep_seeds]
    return runs


# ---- the T5 encoder and its feature cache ---------------------------------------------------

def build_t5(out: Path, tokenizer_dir: Path, seed: int) -> dict:
    """An untrained T5 encoder over the shapes tokenizer, saved with save_pretrained (a T5EncoderModel
    folder that `text_encoders` and the exported pipeline load like a real one)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    if (out / "config.json").is_file():
        return {"t5": str(out), "reused": True}
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, **T5_SIZE)
    tmp = out.with_name(out.name + ".tmp")
    T5EncoderModel(cfg).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return {"t5": str(out), "size": T5_SIZE, "seed": seed}


def t5_train_config(out: Path, t5_dir: Path) -> Path:
    """train_base.yaml with the T5 encoder and its own feature cache, as OUT/train_t5.yaml."""
    from t2i_recap.train_config import TrainConfig

    data = load_yaml(out / "train_base.yaml")
    data["text_encoder"] = {**data.get("text_encoder", {}), "name_or_path": str(t5_dir), "max_length": None}
    data["features"] = {**data.get("features", {}), "cache_dir": str(out / "features_t5")}
    path = out / "train_t5.yaml"
    save_config(from_dict(TrainConfig, data, str(path)), path)
    return path


def prepare_t5(out: Path, t5_dir: Path) -> dict:
    path = t5_train_config(out, t5_dir)
    run_command(["prepare", "--config", str(path)])
    return {"cache": str(out / "features_t5"), "train_config": str(path)}


# ---- stages ---------------------------------------------------------------------------------

def sweep_stages(demo) -> list[Stage]:
    """The demo's shared stages, the T5 preparation, a train and an eval stage per run, the report."""
    cfg, out = demo.cfg, demo.out
    stages = list(demo.shared_stages())
    if cfg.sweep_t5:
        t5_dir = out / "t5_text"
        stages.append(Stage("t5_encoder", lambda: build_t5(t5_dir, demo.assets / "tokenizer", cfg.seed),
                            {"size": T5_SIZE, "seed": cfg.seed}, 5, ("assets",)))
        stages.append(Stage("prepare_t5", lambda: prepare_t5(out, t5_dir), {"encoder": "t5"},
                            demo.prepare_seconds(), ("prepare", "t5_encoder")))
    runs = plan(cfg)
    for encoder, p, seed in runs:
        name = run_name(encoder, p, seed, cfg.seed)
        if encoder == "clip" and seed == cfg.seed:
            stages += demo.run_stages(p)
        else:
            config = out / ("train_t5.yaml" if encoder == "t5" else "train_base.yaml")
            stages += demo.run_stages(p, name=name, seed=seed, config=config,
                                      depends="prepare_t5" if encoder == "t5" else "prepare",
                                      settings={"encoder": encoder, "seed": seed})
    stages.append(demo.stats_stage())
    names = {run_name(e, p, s, cfg.seed): (e, p, s) for e, p, s in runs}
    stages.append(Stage("sweep_report", lambda: write_report(out, names),
                        {"runs": sorted(names)}, 5, tuple(f"eval_{n}" for n in names)))
    return stages


def expected_seconds(stages: list[Stage], workers: int) -> float:
    """Serial stages one after another, isolated ones `workers` at a time."""
    serial = sum(s.expected_seconds for s in stages if not s.isolated)
    side = sum(s.expected_seconds for s in stages if s.isolated)
    return serial + side / max(1, workers)


# ---- aggregation ----------------------------------------------------------------------------

def _percentile_ci(boots: np.ndarray) -> list[float]:
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return [float(lo), float(hi)]


def pooled_alignment(prompt_sets: list[list[dict]], key: str = "oracle_accuracy", seed: int = 0) -> dict:
    """Each prompt's `key` averaged over the seeds' models, then the mean of category means with a
    bootstrap over prompts within categories (the reports' own GenEval-style headline)."""
    by_id: dict[str, dict] = {}
    for prompts in prompt_sets:
        for p in prompts:
            if p.get(key) is not None:
                entry = by_id.setdefault(p["id"], {"category": p["category"], "values": []})
                entry["values"].append(p[key])
    groups: dict[str, list[float]] = {}
    for entry in by_id.values():
        groups.setdefault(entry["category"], []).append(float(np.mean(entry["values"])))
    if not groups:
        return {"mean": None, "ci": None, "n": 0}
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(v) for v in groups.values()]
    boots = np.mean([x[rng.integers(0, x.size, size=(N_BOOT, x.size))].mean(axis=1) for x in arrays], axis=0)
    return {"mean": float(np.mean([x.mean() for x in arrays])), "ci": _percentile_ci(boots),
            "n": int(sum(x.size for x in arrays))}


def pooled_mean(prompt_sets: list[list[dict]], key: str, seed: int = 0) -> dict:
    """A per-prompt metric (e.g. oracle_objects, dense prompts only) averaged over seeds, then over
    prompts, with a plain bootstrap over prompts."""
    by_id: dict[str, list[float]] = {}
    for prompts in prompt_sets:
        for p in prompts:
            if p.get(key) is not None:
                by_id.setdefault(p["id"], []).append(p[key])
    if not by_id:
        return {"mean": None, "ci": None, "n": 0}
    x = np.asarray([np.mean(v) for v in by_id.values()])
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(N_BOOT, x.size))].mean(axis=1)
    return {"mean": float(x.mean()), "ci": _percentile_ci(boots), "n": int(x.size)}


def aggregate(reports: dict[tuple[str, float, int], dict]) -> dict:
    """Rows per (encoder, p): pooled alignment per prompt form, each seed's own score, dense objects."""
    keys = sorted({(e, p) for e, p, _ in reports}, key=lambda k: (k[0] != "clip", k[0], k[1]))
    suites = {r["provenance"]["suite"]["sha256"] for r in reports.values()}
    if len(suites) > 1:
        raise ValueError(f"the sweep's runs were scored on {len(suites)} different prompt suites; rerun their evals")
    rows = []
    for encoder, p in keys:
        seeds = sorted(s for e, q, s in reports if (e, q) == (encoder, p))
        row = {"encoder": encoder, "p": p, "seeds": seeds, "variants": {}}
        for v in VARIANTS:
            sets = [reports[(encoder, p, s)]["variants"][v]["prompts"] for s in seeds
                    if v in reports[(encoder, p, s)]["variants"]]
            if not sets:
                continue
            per_seed = [reports[(encoder, p, s)]["variants"][v]["metrics"]["oracle_geneval"]["mean"] for s in seeds]
            row["variants"][v] = {"alignment": pooled_alignment(sets), "per_seed": per_seed,
                                  "dense_objects": pooled_mean(sets, "oracle_objects")}
        rows.append(row)
    return {"kind": "t2i-recap demo sweep", "rows": rows, "suite_sha256": next(iter(suites), None)}


def render_markdown(result: dict) -> str:
    lines = ["# Caption-mixing sweep (the paper's Table 7 as a curve, shapes world)", "",
             "Shapes-oracle alignment (GenEval-style mean over categories): each prompt's accuracy averaged "
             "over the seeds' models, mean [95% bootstrap CI over prompts]; per-seed scores beside it. "
             "p = share of ORIGINAL captions. T5: an untrained T5-shaped encoder (see docs/sweeps.md).", ""]
    heads = ["text encoder", "p", "seeds", "raw prompts", "raw per seed", "recaptioned prompts",
             "recap per seed", "dense objects found (recap)"]
    rows = []
    for r in result["rows"]:
        cells = [r["encoder"], f"{r['p']:g}", str(len(r["seeds"]))]
        for v in VARIANTS:
            cell = r["variants"].get(v)
            cells += [fmt_ci(cell["alignment"]), ", ".join(f"{x:.3f}" for x in cell["per_seed"])] if cell else ["-", "-"]
        dense = r["variants"].get("recap", {}).get("dense_objects")
        cells.append(fmt_ci(dense))
        rows.append(cells)
    lines += md_table(heads, rows) + ["", "Figure: sweep.png."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    panels = []
    for v, title in (("raw", "Raw prompts"), ("recap", "Recaptioned prompts")):
        series: dict[str, list] = {}
        for r in result["rows"]:
            cell = r["variants"].get(v)
            if cell:
                series.setdefault(f"{r['encoder'].upper()} text encoder", []).append((r["p"], cell["alignment"]))
        panels.append((title, series))
    return plot_against_p(panels, path, "DiT caption-mixing sweep (shapes oracle, pooled over seeds)",
                          ylabel="oracle alignment")


def write_report(out: Path, names: dict[str, tuple[str, float, int]]) -> dict:
    reports = {}
    for name, key in names.items():
        path = out / "runs" / name / "eval" / "report.json"
        reports[key] = json.loads(path.read_text(encoding="utf-8"))
    result = aggregate(reports)
    folder = out / "sweep"
    atomic_write_text(folder / "sweep.json", json.dumps(result, indent=1))
    atomic_write_text(folder / "sweep.md", render_markdown(result))
    plot(result, folder / "sweep.png")
    return {"report": str(folder / "sweep.md"), "figure": str(folder / "sweep.png")}
