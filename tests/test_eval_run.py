"""`t2i-recap eval run` / `eval compare` end to end on a tiny exported pipeline (CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fixtures_eval import EVAL_RES
from t2i_recap.cli import main as cli_main
from t2i_recap.config import from_dict
from t2i_recap.evaluate.compare import compare
from t2i_recap.evaluate.protocol import recaptions
from t2i_recap.evaluate.run import EvalConfig, run_eval
from t2i_recap.evaluate.suites import shapes_suite
from t2i_recap.shapes.render import render

HOSTILE = [
    "<script>alert('pwned')</script> a red circle",
    'a blue square <img src=x onerror="alert(1)"> & friends',
    "a green \x07triangle\x1b[31m with\x00 control chars",
    "</td></tr></table><h1>layout break</h1>",
]


def _cfg(tmp_path, model, **kw) -> EvalConfig:
    base = dict(model=str(model), out=str(tmp_path / "eval"), per_category=2, images_per_prompt=2, batch_size=8)
    return from_dict(EvalConfig, base | kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, eval_pipeline_dir, eval_clip_dir):
    """One real run: tiny pipeline, shapes suite, gold recaptions, CLIP metrics, via the CLI."""
    out = tmp_path_factory.mktemp("run") / "eval"
    rc = cli_main(["eval", "run", "--model", str(eval_pipeline_dir), "--suite", "shapes", "--out", str(out),
                   "--images-per-prompt", "2", "--per-category", "2", "--batch-size", "8", "--clip", str(eval_clip_dir),
                   "--recaption", "gold", "--seed", "3"])
    assert rc == 0
    return out


def test_run_writes_all_three_reports_with_provenance(tiny_run, eval_pipeline_dir):
    for name in ("report.json", "report.md", "report.html", "suite.jsonl", "eval_config.yaml", "scores_raw.jsonl"):
        assert (tiny_run / name).is_file(), name
    report = json.loads((tiny_run / "report.json").read_text())
    prov = report["provenance"]
    suite = shapes_suite(per_category=2)
    assert prov["suite"]["sha256"] == suite.hash() and prov["suite"]["num_prompts"] == len(suite.records)
    assert len(prov["model"]["sha256"]) == 64 and prov["model"]["sidecar"]["resolution"] == EVAL_RES
    assert prov["generation"]["seed"] == 3 and prov["generation"]["num_inference_steps"] == 2  # from t2i_recap.json
    assert prov["versions"]["torch"] and prov["versions"]["torchmetrics"] and prov["recaption"]["source"] == "gold"
    assert set(report["variants"]) == {"raw", "recap"}
    for v in report["variants"].values():
        assert len(v["prompts"]) == len(suite.records)
        assert {"oracle_accuracy", "oracle_geneval", "clip_score"} <= set(v["metrics"])
        assert {"fd_clip", "cmmd"} <= set(v["set_metrics"])
        assert set(v["by_category"]) == set(suite.categories)
        lo, hi = v["metrics"]["clip_score"]["ci"]
        assert lo <= v["metrics"]["clip_score"]["mean"] <= hi
        seeds = [im["seed"] for p in v["prompts"] for im in p["images"]]
        assert seeds == [3 + i for i in range(2 * len(suite.records))]  # same seeds in both forms
    assert (tiny_run / "images" / "recap" / "00000_01.png").is_file()
    assert "## Metrics" in (tiny_run / "report.md").read_text()


def test_rerun_resumes_without_regenerating(tiny_run, eval_pipeline_dir, eval_clip_dir):
    first = json.loads((tiny_run / "report.json").read_text())
    before = (tiny_run / "images" / "raw" / "00003_00.png").read_bytes()
    (tiny_run / "images" / "raw" / "00003_01.png").unlink()  # a crash lost one image
    rc = cli_main(["eval", "run", "--model", str(eval_pipeline_dir), "--out", str(tiny_run), "--per-category", "2",
                   "--images-per-prompt", "2", "--batch-size", "8", "--clip", str(eval_clip_dir), "--recaption", "gold",
                   "--seed", "3"])
    assert rc == 0
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["timing"]["images_generated"] == {"raw": 1, "recap": 0}
    assert (tiny_run / "images" / "raw" / "00003_00.png").read_bytes() == before
    # the regenerated image is the same as before (seeded per image), so every score is unchanged
    assert report["variants"]["raw"]["metrics"] == first["variants"]["raw"]["metrics"]


def _gold_generator(suite):
    texts, _ = recaptions(suite, "gold")
    scene_of = {r.prompt: r.gold_scene() for r in suite.records}
    scene_of.update({t: r.gold_scene() for r, t in zip(suite.records, texts)})

    def generate(pipe, prompts, seeds, settings):
        return [render(scene_of[p], settings.resolution) for p in prompts]
    return generate


def _noise_generator(pipe, prompts, seeds, settings):
    return [Image.fromarray(np.random.default_rng(s).integers(0, 256, (settings.resolution,) * 2 + (3,), dtype=np.uint8))
            for s in seeds]


def test_gold_images_score_100_and_noise_near_0_through_the_whole_run(tmp_path, eval_pipeline_dir):
    suite = shapes_suite(per_category=3)
    gold = json.loads(run_eval(_cfg(tmp_path / "g", eval_pipeline_dir, per_category=3, recaption="gold"),
                               generate=_gold_generator(suite)).read_text())
    for v in gold["variants"].values():
        assert v["metrics"]["oracle_geneval"]["mean"] == 1.0 and v["metrics"]["oracle_fraction"]["mean"] == 1.0
        assert all(c["oracle_accuracy"]["mean"] == 1.0 for c in v["by_category"].values())
    noise = json.loads(run_eval(_cfg(tmp_path / "n", eval_pipeline_dir, per_category=3),
                                generate=_noise_generator).read_text())
    assert set(noise["variants"]) == {"raw"}
    assert noise["variants"]["raw"]["metrics"]["oracle_geneval"]["mean"] <= 0.05
    html = (tmp_path / "n" / "eval" / "report.html").read_text()
    assert "Worst failures" in html and "expected" in html


def test_hostile_prompts_are_escaped_everywhere(tmp_path, eval_pipeline_dir):
    prompts = tmp_path / "hostile.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"h{i}", "prompt": p, "category": "<b>cat</b>"}) + "\n"
                               for i, p in enumerate(HOSTILE)))
    path = run_eval(_cfg(tmp_path, eval_pipeline_dir, suite=str(prompts), images_per_prompt=1),
                    generate=_noise_generator)
    html = (path.parent / "report.html").read_text()
    md = (path.parent / "report.md").read_text()
    for text in (html, md):
        assert "<script" not in text and "<img src=x" not in text and "<h1>layout" not in text
        assert "\x07" not in text and "\x00" not in text and "\x1b" not in text
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert "\\x07triangle\\x1b" in html and "&lt;b&gt;cat&lt;/b&gt;" in html
    assert html.count("<table") == html.count("</table>")


def test_fid_through_the_whole_run(tmp_path, eval_pipeline_dir):
    """FID from a local Inception file against the suite's gold renders: gold images come out far
    closer to the reference than noise does, and report.json records the number with its settings."""
    from fixtures_eval import write_fid_inception_weights

    suite = shapes_suite(per_category=1)
    weights, _ = write_fid_inception_weights(tmp_path, [render(r.gold_scene(), EVAL_RES) for r in suite.records[:6]])
    fid = {}
    for name, gen in (("gold", _gold_generator(suite)), ("noise", _noise_generator)):
        cfg = _cfg(tmp_path / name, eval_pipeline_dir, per_category=1, images_per_prompt=1, reference="gold",
                   inception_weights=str(weights))
        report = json.loads(run_eval(cfg, generate=gen).read_text())
        fid[name] = report["variants"]["raw"]["set_metrics"]["fid"]
        details = report["variants"]["raw"]["set_details"]["fid"]
        assert details["antialias"] is False and details["weights"] == str(weights)
        assert "FID" in (tmp_path / name / "eval" / "report.md").read_text()
    assert fid["gold"] < 1e-3 * fid["noise"]


def test_missing_metric_weights_fail_before_generating(tmp_path, eval_pipeline_dir, capsys):
    rc = cli_main(["eval", "run", "--model", str(eval_pipeline_dir), "--out", str(tmp_path / "o"),
                   "--inception-weights", str(tmp_path / "pt_inception-2015-12-05.pth")])
    assert rc == 2
    assert "pt_inception-2015-12-05.pth does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o" / "images").exists()
    rc = cli_main(["eval", "run", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "no_model" in capsys.readouterr().err


def test_compare_builds_table7_with_paired_intervals(tmp_path, eval_pipeline_dir, tiny_run, capsys):
    other_model = tmp_path / "model_p1"
    shutil.copytree(eval_pipeline_dir, other_model)
    sidecar = json.loads((other_model / "t2i_recap.json").read_text()) | {"caption_p": 1.0}
    (other_model / "t2i_recap.json").write_text(json.dumps(sidecar))
    suite = shapes_suite(per_category=2)
    run_eval(_cfg(tmp_path / "p1", other_model, recaption="gold"), generate=_gold_generator(suite))
    rc = cli_main(["eval", "compare", str(tmp_path / "p1" / "eval"), str(tiny_run), "--out", str(tmp_path / "cmp")])
    assert rc == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["p=0.00", "p=1.00"]  # sorted by p, as Table 7
    assert result["same_suite"] and result["headline"] == "oracle_accuracy"
    diff = result["rows"][1]["variants"]["raw"]["paired_diff"]
    assert diff["mean"] > 0 and diff["ci"][0] <= diff["mean"] <= diff["ci"][1]  # gold images beat the random model
    for name in ("compare.md", "compare.html"):
        assert (tmp_path / "cmp" / name).is_file()
    assert "p=1.00" in capsys.readouterr().out
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="report.json does not exist"):
        compare([tmp_path / "x"])
    hostile = json.loads((tiny_run / "report.json").read_text())
    hostile["provenance"]["suite"]["sha256"] = "0" * 64
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "report.json").write_text(json.dumps(hostile))
    with pytest.raises(ValueError, match="different prompt suites"):
        compare([tiny_run, tmp_path / "y"])


def test_run_over_a_trained_run_folder_exports_it_first(tmp_path, train_assets, train_shards):
    """`--model RUN`: a training run's checkpoint (trained a few steps here) is exported, then evaluated."""
    from fixtures_train import train_config_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    shards, side = train_shards
    run = tmp_path / "run"
    train(from_dict(TrainConfig, train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 2},
                                                   checkpoint={"every_steps": 2}, validation={"every_steps": -1})))
    path = run_eval(_cfg(tmp_path, run, per_category=1, images_per_prompt=1))
    report = json.loads(path.read_text())
    assert (path.parent / "model" / "model_index.json").is_file()
    assert report["provenance"]["model"]["sidecar"]["caption_p"] == 0.0
    assert report["variants"]["raw"]["metrics"]["oracle_accuracy"]["n"] == len(shapes_suite(per_category=1).records)
    for name in ("report.json", "report.md", "report.html"):
        assert (path.parent / name).stat().st_size > 0


def test_recaptions_and_vqa_from_a_local_captioner(tmp_path, eval_pipeline_dir, tiny_llava_dir):
    """The paper's protocol with a real (tiny, random) LLaVA folder: it recaptions the gold render of
    each prompt and answers the VQA questions; both are recorded with the model's hash."""
    cfg = _cfg(tmp_path, eval_pipeline_dir, per_category=1, images_per_prompt=1, recaption=str(tiny_llava_dir),
               vqa_model=str(tiny_llava_dir), recaption_max_new_tokens=6)
    report = json.loads(run_eval(cfg, generate=_noise_generator).read_text())
    recap = report["provenance"]["recaption"]
    assert recap["source"] == "captioner" and len(recap["sha256"]) == 64 and recap["max_new_tokens"] == 6
    assert report["provenance"]["metrics"]["vqa_model"]["sha256"] == recap["sha256"]
    texts = [json.loads(line) for line in (tmp_path / "eval" / "recaptions.jsonl").read_text().splitlines()[1:]]
    assert len(texts) == len(shapes_suite(per_category=1).records)
    for v in report["variants"].values():
        assert 0.0 <= v["metrics"]["vqa"]["mean"] <= 1.0 and 0.0 <= v["metrics"]["vqa_derived"]["mean"] <= 1.0
