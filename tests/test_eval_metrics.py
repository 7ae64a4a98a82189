"""CLIP score, CLIP-feature distances, FID and VQA: local weights only, honest about truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_eval import EVAL_RES, build_tiny_clip, write_fid_inception_weights
from t2i_recap.evaluate.metric_clip import ClipScorer, to_uint8_tensor
from t2i_recap.evaluate.metric_fid import clip_distances, cmmd, inception_fid, load_reference
from t2i_recap.evaluate.metric_vqa import VqaScorer, constraint_question
from t2i_recap.evaluate.suites import shapes_suite
from t2i_recap.evaluate.weights import MissingWeightsError
from t2i_recap.shapes.render import render


@pytest.fixture(scope="module")
def clip_scorer(eval_clip_dir):
    return ClipScorer(eval_clip_dir, device="cpu")


def _images(n, seed=0):
    suite = shapes_suite(per_category=4, seed=seed)
    return [render(r.gold_scene(), EVAL_RES) for r in suite.records[:n]], [r.prompt for r in suite.records[:n]]


def test_clip_score_matches_a_direct_computation(clip_scorer):
    images, prompts = _images(6)
    scores = clip_scorer.score(images, prompts, batch_size=4)
    model, proc = clip_scorer.model, clip_scorer.processor
    with torch.no_grad():
        img = model.get_image_features(proc(images=[to_uint8_tensor(i) for i in images], return_tensors="pt")["pixel_values"])
        tok = proc.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(tok["input_ids"], tok["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    np.testing.assert_allclose(scores, np.maximum(100 * cos, 0), atol=1e-3)
    summary = clip_scorer.summary(prompts)
    assert summary["truncated_prompts"] == 0 and summary["max_text_positions"] == 77
    # torchmetrics' own metric object, fed the same data, gives the same mean
    clip_scorer.metric.update([to_uint8_tensor(i) for i in images], prompts)
    assert float(clip_scorer.metric.compute()) == pytest.approx(max(float(np.mean(100 * cos)), 0), abs=1e-3)


def test_long_prompts_are_counted_and_keep_their_end_token(tmp_path, shapes_tokenizer_dir, clip_scorer):
    long = " ".join(["a small red circle in the top left corner and"] * 12) + " a square."
    n_tokens = clip_scorer.token_lengths([long])[0]
    assert n_tokens > 77
    assert clip_scorer.summary([long, "a red circle"])["truncated_prompts"] == 1
    tok = clip_scorer.metric.processor(text=[long], return_tensors="pt", padding=True)
    assert tok["input_ids"].shape[1] == 77 and tok["input_ids"][0, -1] == clip_scorer.processor.tokenizer.eos_token_id
    # A CLIP with a longer position table (Long-CLIP style) reads the whole prompt.
    longer = ClipScorer(build_tiny_clip(tmp_path / "long", shapes_tokenizer_dir, max_positions=n_tokens + 8), "cpu")
    assert longer.summary([long])["truncated_prompts"] == 0 and longer.max_length == n_tokens + 8
    img, _ = _images(1)
    assert len(longer.score(img, [long])) == 1


def test_metrics_name_the_missing_local_file(tmp_path, eval_clip_dir):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        ClipScorer(tmp_path / "no_clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"empty/config.json does not exist"):
        ClipScorer(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    (tmp_path / "empty" / "preprocessor_config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"empty/model.safetensors"):
        ClipScorer(tmp_path / "empty")
    images, _ = _images(2)
    with pytest.raises(MissingWeightsError, match=r"pt_inception.pth does not exist"):
        inception_fid(images, images, tmp_path / "pt_inception.pth")
    with pytest.raises(MissingWeightsError, match="--inception-weights"):
        inception_fid(images, images, None)
    with pytest.raises(MissingWeightsError, match=r"vlm/config.json|vlm does not exist"):
        VqaScorer(tmp_path / "vlm")


def test_clip_feature_distances(clip_scorer):
    a, _ = _images(16, seed=0)
    b, _ = _images(16, seed=1)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (EVAL_RES, EVAL_RES, 3), dtype=np.uint8)) for _ in range(16)]
    same = clip_distances(a, a, clip_scorer, batch_size=8)
    assert abs(same["fd_clip"]) < 1e-3 and abs(same["cmmd"]) < 1e-6
    near, far = clip_distances(b, a, clip_scorer), clip_distances(noise, a, clip_scorer)
    assert 0 < near["fd_clip"] < far["fd_clip"] and 0 < near["cmmd"] < far["cmmd"]


def test_cmmd_properties():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(60, 8, generator=g) + 1.0
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x)) and cmmd(x, y) > 0


def test_reference_images_from_folder_and_shards(tmp_path):
    import io
    import tarfile

    images, _ = _images(3)
    (tmp_path / "ref" / "sub").mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(tmp_path / "ref" / ("sub" if i else "") / f"{i}.png")
    (tmp_path / "ref" / "broken.png").write_bytes(b"not a png")
    assert len(load_reference(tmp_path / "ref")) == 3  # the broken file is skipped with a warning
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            info = tarfile.TarInfo(f"00000{i:04d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    assert len(load_reference(str(tmp_path / "00000.tar"), limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "nothing*.tar")


def test_vqa_questions_follow_the_constraints():
    suite = shapes_suite(per_category=2)
    questions = {r.category: [constraint_question(c) for c in r.constraints] for r in suite.records}
    assert all(q.endswith("Please answer yes or no.") for qs in questions.values() for q in qs)
    assert questions["counting"][0].startswith("Are there exactly")
    assert any("to the" in q or "above" in q or "below" in q for q in questions["position"])
    assert any("shapes?" in q for q in questions["dense"])


def test_vqa_scorer_with_a_local_backend(monkeypatch, tmp_path):
    """VqaScorer averages derived questions per image; the backend is stubbed (its own tests
    cover P(yes)), the folder check is real."""
    import sys
    import types

    calls = []

    class FakeBackend:
        def __init__(self, model, device=None):
            self.model = model

        def yes_probability(self, images, questions):
            calls.append(list(questions))
            return [0.9 if "Does this figure" in q else 0.5 for q in questions]

    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "t2i_recap.captioner.backend", types.SimpleNamespace(TransformersBackend=FakeBackend))
    scorer = VqaScorer(folder)
    suite = shapes_suite(per_category=1)
    images, prompts = _images(2)
    out = scorer.score(images, prompts, [suite.records[0].constraints, []], batch_size=1)
    assert out[0] == {"vqa": 0.9, "vqa_derived": 0.5} and out[1] == {"vqa": 0.9}


def test_set_distances_stream_and_keep_the_reference_between_variants(clip_scorer):
    from t2i_recap.evaluate.metric_fid import SetDistances

    ref, _ = _images(12, seed=0)
    gen_a, _ = _images(12, seed=1)
    gen_b, _ = _images(12, seed=2)
    d = SetDistances(clip=clip_scorer, batch_size=5)
    for start in range(0, 12, 5):  # the reference arrives in chunks
        d.add(ref[start:start + 5], real=True)
    d.add(gen_a[:7], real=False)
    d.add(gen_a[7:], real=False)
    first = d.compute()["clip_distance"]
    d.reset_generated()
    d.add(gen_b, real=False)
    second = d.compute()["clip_distance"]
    for got, gen in ((first, gen_a), (second, gen_b)):
        want = clip_distances(gen, ref, clip_scorer)
        assert got["fd_clip"] == pytest.approx(want["fd_clip"], rel=1e-4, abs=1e-4)
        assert got["cmmd"] == pytest.approx(want["cmmd"], rel=1e-4, abs=1e-6) and got["num_reference"] == 12
    with pytest.raises(ValueError, match="need a CLIP model"):
        SetDistances()


def test_fid_from_a_local_inception_file(tmp_path):
    from t2i_recap.evaluate.inception import load_fid_inception

    pth, st = write_fid_inception_weights(tmp_path, _images(6, seed=2)[0])
    x = (torch.rand(2, 3, 40, 56) * 255).to(torch.uint8)
    with torch.no_grad():  # both file formats hold the same network
        torch.testing.assert_close(load_fid_inception(st)(x), load_fid_inception(pth)(x), rtol=0, atol=0)
    a, _ = _images(6, seed=0)
    b, _ = _images(6, seed=1)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (EVAL_RES, EVAL_RES, 3), dtype=np.uint8)) for _ in range(6)]
    same = inception_fid(a, a, pth, batch_size=4)
    near, far = inception_fid(b, a, pth), inception_fid(noise, a, pth)
    assert abs(same) < 1e-2 * near and 0 < near < far
    smooth = inception_fid(b, a, pth, antialias=True)  # the other resize: a different, finite number
    assert np.isfinite(smooth) and smooth != pytest.approx(near, rel=1e-6)


def test_fid_refuses_a_file_that_is_not_the_inception_weights(tmp_path, eval_clip_dir):
    images, _ = _images(2)
    with pytest.raises(ValueError, match=r"model.safetensors: not the FID Inception-v3"):
        inception_fid(images, images, eval_clip_dir / "model.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match=r"junk.pth: not a readable weights file"):
        inception_fid(images, images, tmp_path / "junk.pth")


def test_fid_network_matches_torch_fidelity(tmp_path):
    """Where torch-fidelity imports (it needs a working torchvision), its network and ours give the
    same features from the same file: ours is a copy, layer for layer."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", exc_type=ImportError)
    from t2i_recap.evaluate.inception import load_fid_inception

    weights, _ = write_fid_inception_weights(tmp_path, _images(6, seed=2)[0])
    ref = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    x = (torch.rand(2, 3, 40, 56) * 255).to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(load_fid_inception(weights)(x), ref(x)[0], rtol=0, atol=1e-5)
