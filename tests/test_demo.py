"""`t2i-recap demo --quick` end to end: every stage runs, leaves well-formed outputs, and a rerun skips."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from t2i_recap import demo


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick"]) == 0

    stages = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    expected = {"world", "assets", "captioner", "fidelity", "recaption", "stats", "prepare",
                "train_p1_00", "eval_p1_00", "train_p0_00", "eval_p0_00", "compare"}
    assert set(stages) == expected

    # world: web shards in img2dataset layout, a curated share, a held-out test set
    web = sorted((out / "data" / "web").glob("*.tar"))
    assert web and all((p.with_suffix(".parquet")).exists() for p in web)
    assert stages["world"]["summary"]["web"]["curated"] > 0
    # assets: loadable folders and recorded quality
    for part in ("clip", "vae", "tokenizer"):
        assert (out / "assets" / part / "config.json").exists() or part == "tokenizer"
    # captioner: a transformers folder; fidelity report with the exact-match rate
    assert (out / "captioner" / "config.json").exists()
    fidelity = json.loads((out / "fidelity" / "fidelity.json").read_text())
    assert 0.0 <= fidelity["overall"]["exact_match"] <= 1.0
    # recaption: one sidecar per web shard, one row per sample, never the gold caption
    total = 0
    for shard in web:
        table = pq.read_table(out / "recaptions" / f"{shard.stem}.parquet").to_pylist()
        total += len(table)
        assert {"key", "org_caption", "re_caption", "status", "finish_reason"} <= set(table[0])
    assert total == demo.QUICK["num_web"]
    assert json.loads((out / "caption_stats" / "stats.json").read_text())
    # training: an exported pipeline per p, evaluated with all three report files
    for name in ("p1_00", "p0_00"):
        run = out / "runs" / name
        assert (run / "export" / "model_index.json").exists()
        for report in ("report.json", "report.md", "report.html"):
            assert (run / "eval" / report).stat().st_size > 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["step"] == demo.QUICK["train_steps"]
    p0 = json.loads((out / "runs" / "p0_00" / "summary.json").read_text())["mix_counts"]
    p1 = json.loads((out / "runs" / "p1_00" / "summary.json").read_text())["mix_counts"]
    assert p0["original"] == 0 and p0["recaption"] > 0  # p = 0: recaptions only
    assert p1["recaption"] == 0 and p1["original"] > 0  # p = 1: original alt-texts only
    compare = json.loads((out / "report" / "compare.json").read_text())
    assert [row["label"] for row in compare["rows"]] == ["p=1", "p=0"]
    assert "Overall shapes-oracle alignment" in capsys.readouterr().out

    # a rerun skips every finished stage
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert demo.main(["--out", str(out), "--quick"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == before


def test_stage_runner_overlaps_isolated_stages_and_runs_others_alone(tmp_path):
    import threading

    from t2i_recap.stages import Stage, StageRunner

    active, seen, lock = set(), {}, threading.Lock()
    both_trains = threading.Barrier(2, timeout=10)  # passes only if the two run at the same time

    def work(name, barrier=None):
        def run():
            with lock:
                active.add(name)
                seen[name] = set(active)
            if barrier is not None:
                barrier.wait()
            with lock:
                active.discard(name)
            return {"name": name}
        return run

    stages = [Stage("prepare", work("prepare"), {}, 1),
              Stage("train_a", work("train_a", both_trains), {}, 1, ("prepare",), isolated=True),
              Stage("train_b", work("train_b", both_trains), {}, 1, ("prepare",), isolated=True),
              Stage("compare", work("compare"), {}, 1, ("train_a", "train_b"))]
    summaries = StageRunner(tmp_path).run_all(stages, workers=2)
    assert set(summaries) == {"prepare", "train_a", "train_b", "compare"}
    assert seen["prepare"] == {"prepare"} and seen["compare"] == {"compare"}  # alone
    assert {"train_a", "train_b"} <= seen["train_a"] | seen["train_b"]  # side by side
    # one worker: the same stages one after the other (a barrier of two would time out)
    stages[1], stages[2] = (Stage(s.name, work(s.name), {}, 1, s.depends, isolated=True) for s in stages[1:3])
    seen.clear()
    StageRunner(tmp_path / "serial").run_all(stages, workers=1)
    assert all(v == {k} for k, v in seen.items())


def test_stage_runner_stops_on_a_failed_stage_and_checks_the_order(tmp_path):
    from t2i_recap.stages import Stage, StageRunner

    def boom():
        raise RuntimeError("stage exploded")

    stages = [Stage("a", lambda: {}, {}, 1),
              Stage("bad", boom, {}, 1, ("a",), isolated=True),
              Stage("ok", lambda: {"fine": True}, {}, 1, ("a",), isolated=True),
              Stage("after", lambda: {}, {}, 1, ("bad",))]
    with pytest.raises(RuntimeError, match="stage exploded"):
        StageRunner(tmp_path).run_all(stages, workers=2)
    markers = {p.stem for p in (tmp_path / "stages").glob("*.json")}
    assert "bad" not in markers and "after" not in markers and "a" in markers
    with pytest.raises(ValueError, match="listed after what they depend on"):
        StageRunner(tmp_path / "x").run_all([Stage("b", lambda: {}, {}, 1, ("a",)), Stage("a", lambda: {}, {}, 1)])
