"""`t2i-recap eval retrieval`: zero-shot retrieval / classification reports for CLIPModel folders."""

from __future__ import annotations

import json

import pytest
import torch

from t2i_recap.evaluate import retrieval
from t2i_recap.evaluate.compare import main as compare_main

SMALL = dict(n=30, n_long=20, per_class=3, resolution=16)


@pytest.fixture(scope="module")
def suite():
    return retrieval.shapes_suite(**SMALL)


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory, shapes_tokenizer_dir):
    """An untrained tiny CLIPModel + CLIPProcessor folder (16 px)."""
    from t2i_recap.clip.config import ClipModelConfig
    from t2i_recap.clip.model import build_model, build_processor, load_tokenizer
    from t2i_recap.shapes.train_clip import save_clip

    out = tmp_path_factory.mktemp("random_clip")
    cfg = ClipModelConfig(tokenizer=str(shapes_tokenizer_dir), text_max_length=64, image_size=16, patch_size=4,
                          hidden_size=32, text_hidden_size=32, num_layers=1, num_heads=2, text_num_heads=2,
                          projection_dim=16)
    torch.manual_seed(0)
    tok = load_tokenizer(cfg)
    save_clip(build_model(cfg, tok), tok, build_processor(cfg), out)
    return out


class OracleScorer:
    """Embeds an image and its suite text as the same one-hot vector: a perfect CLIP for `suite`."""

    def __init__(self, suite):
        self.by_image, self.by_text = {}, {}
        pairs = suite["retrieval"] + suite["long"]
        for i, p in enumerate(pairs):
            self.by_image[p["image"].tobytes()] = i
            self.by_text[p["text"]] = i
        self.dim = len(pairs) + 64
        for spec in suite["classification"].values():  # each class its own direction
            for c, label in enumerate(spec["classes"]):
                for t in spec["templates"]:
                    self.by_text[t.format(label)] = len(pairs) + c
            for it in spec["items"]:
                self.by_image[it["image"].tobytes()] = len(pairs) + spec["classes"].index(it["label"])

    def _onehot(self, idx):
        return torch.nn.functional.one_hot(torch.tensor(idx), self.dim).float()

    def images(self, images):
        return self._onehot([self.by_image[im.tobytes()] for im in images])

    def texts(self, texts):
        return self._onehot([self.by_text[t] for t in texts])


def test_suite_texts_unique_and_long_captions_dense(suite):
    texts = [p["text"] for p in suite["retrieval"]]
    assert len(set(texts)) == len(texts) == SMALL["n"]
    assert len(suite["long"]) == SMALL["n_long"]
    assert set(suite["classification"]) == {"shape", "colour", "colour+shape"}
    assert len(suite["classification"]["colour+shape"]["classes"]) == 18
    assert retrieval.suite_digest(suite) == retrieval.suite_digest(retrieval.shapes_suite(**SMALL))


def test_oracle_scores_perfect(suite):
    # one-object classification images may equal retrieval images: the oracle sees one part at a time
    pairs_only = {**suite, "classification": {}}
    m = retrieval.evaluate_scorer(OracleScorer(pairs_only), pairs_only, {"path": "oracle", "sha256": "0"})["metrics"]
    for task in ("retrieval", "long"):
        for key in ("i2t_r1", "t2i_r1", "i2t_r10"):
            assert m[task][key]["mean"] == 1.0
    for name, spec in suite["classification"].items():  # one class set at a time (they share images)
        oracle = OracleScorer({"retrieval": [], "long": [], "classification": {name: spec}})
        assert retrieval.score_classification(oracle, spec, 0)["mean"] == 1.0, name


def test_recall_ties_count_against():
    sims = torch.ones(4, 4)  # every candidate ties with the right one
    assert retrieval.recall_hits(sims)["r1"] == [0.0] * 4
    assert retrieval.recall_hits(torch.eye(4))["r1"] == [1.0] * 4


def test_random_model_near_chance_and_report_files(random_clip, suite, tmp_path):
    out = tmp_path / "rand"
    rc = retrieval.main(["--model", str(random_clip), "--out", str(out), "--n", "30", "--resolution", "16"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            entry = m["retrieval"][f"{d}_r{k}"]
            assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
        assert m["retrieval"][f"{d}_r1"]["mean"] <= 0.2  # chance 1/30
    assert {"i2t_r1", "t2i_r10"} <= set(m["long"])
    assert set(m["classification"]) == {"shape", "colour", "colour+shape"}
    assert m["classification"]["colour+shape"]["chance"] == pytest.approx(1 / 18)
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_reports_escape_captions(tmp_path):
    evil = "<script>alert(1)</script> | *bold*"
    report = {"kind": retrieval.KIND, "model": {"path": "m", "sha256": "a" * 64}, "suite": {"name": "s<b>"},
              "metrics": {"retrieval": {"t2i_r1": {"mean": 0.5, "ci": [0.1, 0.9], "n": 2}}, "classification": {}},
              "items": [{"id": "x", "text": evil, "i2t_r1": 0.0, "t2i_r1": 0.0}]}
    html, md = retrieval.render_html(report), retrieval.render_markdown(report)
    assert "<script>" not in html and "&lt;script&gt;" in html and "s&lt;b&gt;" in html
    assert "<script>" not in md and "\\|" in md


def test_file_suite_rejects_bad_label(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "s.json").write_text(json.dumps({"retrieval": [{"image": "a.png", "text": "x"}],
                                                 "classification": {"c": {"classes": ["cat"],
                                                                          "items": [{"image": "a.png", "label": "dog"}]}}}))
    with pytest.raises(ValueError, match="'dog' is not one of its classes"):
        retrieval.file_suite(tmp_path / "s.json")


def test_compare_puts_clip_runs_side_by_side(random_clip, suite, tmp_path):
    suite = {**suite, "classification": {}}
    oracle = retrieval.evaluate_scorer(OracleScorer(suite), suite, {"path": "oracle", "sha256": "0" * 12})
    retrieval.write_reports(oracle, tmp_path / "oracle")
    retrieval.write_reports(retrieval.evaluate(random_clip, suite), tmp_path / "random")
    assert compare_main([str(tmp_path / "oracle"), str(tmp_path / "random"), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["oracle", "random"] and result["same_suite"]
    assert result["rows"][0]["metrics"]["retrieval: t2i R@1"]["mean"] == 1.0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| oracle |" in md and "| random |" in md
