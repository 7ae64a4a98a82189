"""`t2i-recap demo --sweep`: the caption-mixing curve's plan, its pooled statistics and its report;
the quick sweep end to end (slow)."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from t2i_recap import demo, demo_sweep
from t2i_recap.config import from_dict


def _demo(tmp_path, **kw):
    return demo.Demo(from_dict(demo.DemoConfig, kw), tmp_path)


def test_plan_trains_every_p_and_seed_and_shares_the_default_demos_runs(tmp_path):
    d = _demo(tmp_path)
    stages = demo_sweep.sweep_stages(d)
    names = [s.name for s in stages]
    assert len(demo_sweep.plan(d.cfg)) == 4 * 3 + 3
    for p in ("p0_00", "p0_20", "p0_50", "p1_00"):
        assert {f"train_{p}", f"train_{p}_s1", f"train_{p}_s2", f"eval_{p}_s2"} <= set(names)
    assert {"train_t5_p0_00_s0", "train_t5_p0_00_s2", "prepare_t5", "t5_encoder"} <= set(names)
    assert names[-1] == "sweep_report" and "compare" not in names
    by_name = {s.name: s for s in stages}
    # the first seed's CLIP runs are the default demo's stages: same settings, so one is never trained twice
    default = {s.name: s for s in d.stages()}
    for p in ("p0_00", "p1_00"):
        assert by_name[f"train_{p}"].settings == default[f"train_{p}"].settings
        assert by_name[f"eval_{p}"].settings == default[f"eval_{p}"].settings
    assert by_name["train_p0_00_s1"].settings["seed"] == 1 and by_name["train_t5_p0_00_s0"].depends == ("prepare_t5",)
    assert set(by_name["sweep_report"].depends) == {n for n in names if n.startswith("eval_")}
    # the ETA: serial stages one after another, the DiTs two at a time
    eta = demo_sweep.expected_seconds(stages, 2)
    isolated = sum(s.expected_seconds for s in stages if s.isolated)
    assert eta == pytest.approx(sum(s.expected_seconds for s in stages if not s.isolated) + isolated / 2)
    assert eta > 60 * 60  # the full sweep is hours, not the demo's 20 minutes


def test_quick_sweep_is_the_smallest_plan(tmp_path):
    cfg = from_dict(demo.DemoConfig, {**demo.QUICK, **demo.QUICK_SWEEP})
    assert demo_sweep.plan(cfg) == [("clip", 0.0, 0), ("clip", 1.0, 0), ("t5", 0.0, 0)]
    with pytest.raises(ValueError, match="sweep_seeds"):
        from_dict(demo.DemoConfig, {"sweep_seeds": [1, 1]})
    with pytest.raises(ValueError, match="sweep_p_values"):
        from_dict(demo.DemoConfig, {"sweep_p_values": [1.5]})


def test_default_demo_stages_are_unchanged_by_the_sweep(tmp_path):
    names = [s.name for s in _demo(tmp_path).stages()]
    assert names == ["world", "assets", "captioner", "fidelity", "recaption", "prepare", "train_p1_00", "eval_p1_00",
                     "train_p0_00", "eval_p0_00", "stats", "compare"]


def _prompts(values, rng):
    """Per-prompt entries as eval run's report.json holds them: two categories, per-object scores on dense."""
    out = []
    for i, v in enumerate(values):
        cat = "dense" if i % 2 else "colors"
        out.append({"id": f"{cat}-{i:03d}", "category": cat, "oracle_accuracy": v,
                    "oracle_objects": (v + 1) / 2 if cat == "dense" else None})
    return out


def _report(prompts, suite="abc"):
    def geneval(ps):
        cats = {}
        for p in ps:
            cats.setdefault(p["category"], []).append(p["oracle_accuracy"])
        return sum(sum(v) / len(v) for v in cats.values()) / len(cats)
    return {"provenance": {"suite": {"sha256": suite}},
            "variants": {v: {"prompts": prompts, "metrics": {"oracle_geneval": {"mean": geneval(prompts)}}}
                         for v in ("raw", "recap")}}


def test_pooled_alignment_averages_each_prompt_over_seeds():
    rng = random.Random(0)
    seed_a = _prompts([1.0, 0.0, 1.0, 0.5, 0.0, 1.0], rng)
    seed_b = _prompts([0.0, 0.0, 1.0, 1.0, 1.0, 1.0], rng)
    pooled = demo_sweep.pooled_alignment([seed_a, seed_b])
    # colors prompts (0, 2, 4): means 0.5, 1.0, 0.5 -> 2/3; dense (1, 3, 5): 0.0, 0.75, 1.0 -> 7/12
    assert pooled["mean"] == pytest.approx((2 / 3 + 7 / 12) / 2) and pooled["n"] == 6
    assert pooled["ci"][0] <= pooled["mean"] <= pooled["ci"][1] and pooled["ci"][1] - pooled["ci"][0] > 0
    dense = demo_sweep.pooled_mean([seed_a, seed_b], "oracle_objects")
    assert dense["n"] == 3 and dense["mean"] == pytest.approx((0.5 + 0.875 + 1.0) / 3)


def test_report_table_and_figure_from_eval_reports(tmp_path):
    rng = random.Random(1)
    names = {}
    for encoder, p, seed, level in (("clip", 0.0, 0, 0.8), ("clip", 0.0, 1, 0.7), ("clip", 1.0, 0, 0.2),
                                    ("clip", 1.0, 1, 0.1), ("t5", 0.0, 0, 0.4)):
        name = demo_sweep.run_name(encoder, p, seed, 0)
        values = [float(rng.random() < level) for _ in range(40)]
        path = tmp_path / "runs" / name / "eval" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_report(_prompts(values, rng))))
        names[name] = (encoder, p, seed)
    assert set(names) == {"p0_00", "p0_00_s1", "p1_00", "p1_00_s1", "t5_p0_00_s0"}
    demo_sweep.write_report(tmp_path, names)
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [(r["encoder"], r["p"], r["seeds"]) for r in result["rows"]] == [
        ("clip", 0.0, [0, 1]), ("clip", 1.0, [0, 1]), ("t5", 0.0, [0])]
    p0 = result["rows"][0]["variants"]["recap"]
    assert p0["alignment"]["mean"] > result["rows"][1]["variants"]["recap"]["alignment"]["mean"]
    assert len(p0["per_seed"]) == 2
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| t5 | 0 | 1 |" in md and demo_sweep.fmt_ci(p0["alignment"]) in md
    with Image.open(tmp_path / "sweep" / "sweep.png") as img:
        assert img.format == "PNG"
    path = tmp_path / "runs" / "p1_00" / "eval" / "report.json"
    path.write_text(json.dumps(_report(_prompts([1.0] * 40, rng), suite="other")))
    with pytest.raises(ValueError, match="different prompt suites"):
        demo_sweep.write_report(tmp_path, names)


@pytest.mark.slow
def test_quick_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert demo.main(["--out", str(out), "--quick", "--sweep"]) == 0
    printed = capsys.readouterr().out
    assert "demo --sweep: 3 DiTs" in printed and "expected about" in printed
    result = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [(r["encoder"], r["p"]) for r in result["rows"]] == [("clip", 0.0), ("clip", 1.0), ("t5", 0.0)]
    for r in result["rows"]:
        for v in ("raw", "recap"):
            cell = r["variants"][v]["alignment"]
            assert 0.0 <= cell["ci"][0] <= cell["mean"] <= cell["ci"][1] <= 1.0
    t5 = json.loads((out / "runs" / "t5_p0_00_s0" / "export" / "text_encoder" / "config.json").read_text())
    clip = json.loads((out / "runs" / "p0_00" / "export" / "text_encoder" / "config.json").read_text())
    assert t5["model_type"] == "t5" and clip["model_type"] != "t5"
    with Image.open(out / "sweep" / "sweep.png") as img:
        assert img.format == "PNG"
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert demo.main(["--out", str(out), "--quick", "--sweep"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == before
