"""Dense prompts scored per object: the share of a prompt's objects found with the right cell, shape,
colour and size, beside the exact verdict, in eval run's reports, eval compare and the demo's summary."""

from __future__ import annotations

import json

from t2i_recap import demo
from t2i_recap.config import from_dict
from t2i_recap.evaluate.compare import compare, render_markdown, write_compare
from t2i_recap.evaluate.metric_oracle import object_share, score_scene
from t2i_recap.evaluate.run import EvalConfig, run_eval
from t2i_recap.evaluate.suites import shapes_suite
from t2i_recap.shapes.render import render
from t2i_recap.shapes.world import Scene


def _dense(suite):
    return [r for r in suite.records if r.category == "dense"]


def test_object_share_counts_cell_constraints_only():
    record = _dense(shapes_suite(per_category=2))[0]
    scene = record.gold_scene()
    n = len(scene.objects)
    assert score_scene(scene, record.constraints)["objects"] == 1.0
    missing_one = score_scene(Scene(scene.objects[1:]), record.constraints)
    assert missing_one["correct"] == 0.0 and missing_one["objects"] == (n - 1) / n
    assert score_scene(Scene(()), record.constraints)["objects"] == 0.0
    # categories without per-cell objects have no per-object score
    single = shapes_suite(per_category=1).records[0]
    assert object_share(single.constraints, [True] * len(single.constraints)) is None


def _drop_first_dense_object(suite):
    """Every prompt drawn as its gold scene, except that dense prompts lose their first object."""
    scene_of = {}
    for r in suite.records:
        scene = r.gold_scene()
        scene_of[r.prompt] = Scene(scene.objects[1:]) if r.category == "dense" else scene

    def generate(pipe, prompts, seeds, settings):
        return [render(scene_of[p], settings.resolution) for p in prompts]
    return generate


def _run(tmp_path, model, per_category, generator):
    cfg = from_dict(EvalConfig, dict(model=str(model), out=str(tmp_path), per_category=per_category,
                                     images_per_prompt=1, batch_size=8, recaption="none"))
    return json.loads(run_eval(cfg, generate=generator).read_text())


def test_eval_run_reports_dense_objects_beside_exact(tmp_path, eval_pipeline_dir):
    suite = shapes_suite(per_category=4)
    report = _run(tmp_path / "eval", eval_pipeline_dir, 4, _drop_first_dense_object(suite))
    metrics = report["variants"]["raw"]["metrics"]
    expected = sum((len(r.gold_scene().objects) - 1) / len(r.gold_scene().objects) for r in _dense(suite)) / 4
    assert metrics["oracle_objects_exact"]["mean"] == 0.0 and metrics["oracle_objects_exact"]["n"] == 4
    objects = metrics["oracle_objects"]
    assert abs(objects["mean"] - expected) < 1e-9 and objects["n"] == 4  # dense prompts only
    assert objects["ci"][0] <= objects["mean"] <= objects["ci"][1]
    by_cat = report["variants"]["raw"]["by_category"]
    assert by_cat["dense"]["oracle_accuracy"]["mean"] == 0.0
    assert by_cat["single_object"]["oracle_objects"]["mean"] is None
    assert all(c["oracle_accuracy"]["mean"] == 1.0 for name, c in by_cat.items() if name != "dense")
    md = (tmp_path / "eval" / "report.md").read_text()
    html = (tmp_path / "eval" / "report.html").read_text()
    for text in (md, html):
        assert "dense: exact" in text and "dense: objects found" in text
    assert f"{objects['mean']:.3f} [{objects['ci'][0]:.3f}, {objects['ci'][1]:.3f}]" in md


def test_compare_and_demo_summary_show_dense_objects(tmp_path, eval_pipeline_dir):
    suite = shapes_suite(per_category=2)
    gold = {r.prompt: r.gold_scene() for r in suite.records}
    _run(tmp_path / "gold", eval_pipeline_dir, 2,
         lambda pipe, prompts, seeds, s: [render(gold[p], s.resolution) for p in prompts])
    _run(tmp_path / "drop", eval_pipeline_dir, 2, _drop_first_dense_object(suite))
    result = compare([tmp_path / "gold", tmp_path / "drop"], ["gold", "drop"])
    cells = {row["label"]: row["variants"]["raw"] for row in result["rows"]}
    assert cells["gold"]["oracle_objects"]["mean"] == 1.0 and cells["gold"]["oracle_objects_exact"]["mean"] == 1.0
    assert cells["drop"]["oracle_objects_exact"]["mean"] == 0.0 and 0.5 < cells["drop"]["oracle_objects"]["mean"] < 1.0
    assert "raw: dense: objects found" in render_markdown(result)
    write_compare(result, tmp_path / "demo" / "report")
    summary = demo.summarize(tmp_path / "demo")
    drop = cells["drop"]["oracle_objects"]
    assert f"dense objects {drop['mean']:.3f}" in summary and "dense exact 0.000" in summary
