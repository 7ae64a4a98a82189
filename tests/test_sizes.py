"""Generation at non-square sizes (height != width), as a model trained on aspect-ratio buckets is
used: the fast DiT forward, plain diffusers on an export, `generate_images`, `eval run` and its
image-set identity, the export's card for a bucketed run, and the validation config's checks."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from PIL import Image

from t2i_recap.config import from_dict
from t2i_recap.fast_dit import make_fast
from t2i_recap.generation import ValidationConfig, check_size, generate_images, load_pipeline, validation_size

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle"


# ---------------------------------------------------------------- (a) the fast forward off the square


def _dit(sample_size: int) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=2, cross_attention_dim=16, sample_size=sample_size, patch_size=2,
                                     caption_channels=12, norm_num_groups=32, use_additional_conditions=False)
    with torch.no_grad():  # random weights everywhere (diffusers zero-initialises some, which hides mistakes)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("shape", [(8, 16), (16, 8)])
def test_fast_dit_matches_diffusers_at_non_square_latents(shape):
    s = 8
    plain = _dit(s)
    fast = make_fast(copy.deepcopy(plain))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *shape, generator=g)
    text = torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        outs = [m(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
                for m in (plain, fast)]
    assert outs[0].shape == outs[1].shape == (2, 4, *shape)
    assert float((outs[0] - outs[1]).abs().max()) < 1e-5
    assert float(outs[0].std()) > 0.01  # not a degenerate output that would match anything


# ---------------------------------------------------------------- (b) plain diffusers on an export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, train_assets, train_shards):
    """An export of a 1-step training run (16 px, 2x VAE, patch 2: sides in multiples of 4 px)."""
    from fixtures_train import train_config_dict

    from t2i_recap.export import export
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    root = tmp_path_factory.mktemp("sizes_export")
    cfg = train_config_dict(train_assets, train_shards[0], root / "run",
                            trainer={"max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
                            checkpoint={"every_steps": 1}, validation={"every_steps": -1})
    train(from_dict(TrainConfig, cfg))
    return export(root / "run", root / "export")


def test_plain_diffusers_generates_non_square_from_an_export(export_dir):
    from diffusers import DiffusionPipeline

    res = json.loads((export_dir / "t2i_recap.json").read_text())["resolution"]
    pipe = DiffusionPipeline.from_pretrained(str(export_dir))
    pipe.set_progress_bar_config(disable=True)
    for height, width in ((res, 2 * res), (2 * res, res)):
        image = pipe(PROMPT, height=height, width=width, use_resolution_binning=False, num_inference_steps=2,
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
        assert image.size == (width, height)


def test_export_of_a_square_run_records_no_buckets(export_dir):
    settings = json.loads((export_dir / "t2i_recap.json").read_text())
    assert settings["aspect_buckets"] is False and settings["buckets"] is None
    assert "aspect-ratio buckets" not in (export_dir / "README.md").read_text()


def test_card_lists_the_buckets_of_a_bucketed_run():
    from t2i_recap import buckets
    from t2i_recap import export as ex

    cfg = types.SimpleNamespace(data=types.SimpleNamespace(aspect_buckets=True, resolution=32, bucket_multiple=None))
    on, sizes = ex.trained_buckets(cfg, 4)
    assert on and sizes == [list(s) for s in buckets.bucket_table(32, 4)] and [32, 32] in sizes
    lines = "\n".join(ex._bucket_lines({"aspect_buckets": True, "buckets": sizes}))
    h, w = max(sizes, key=lambda s: (s[1] / s[0], s[1]))
    assert w > h and f"pipe({ex.PROMPT!r}, height={h}, width={w}, use_resolution_binning=False)" in lines
    assert all(f"{a}x{b}" in lines for a, b in sizes)
    assert ex.trained_buckets(types.SimpleNamespace(data=types.SimpleNamespace(resolution=32)), 4) == (False, None)
    cfg.data.bucket_multiple = 8  # the table training drew from: data.bucket_multiple when set
    assert ex.trained_buckets(cfg, 4)[1] == [list(s) for s in buckets.bucket_table(32, 8)]


# ---------------------------------------------------------------- (c) generate_images


def test_generate_images_at_a_non_square_size_reproduces(eval_pipeline_dir):
    from fixtures_eval import EVAL_RES

    pipe, settings = load_pipeline(eval_pipeline_dir)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, resolution=EVAL_RES, max_sequence_length=32)
    h, w = EVAL_RES, 2 * EVAL_RES
    a = generate_images(pipe, [PROMPT, "two green triangles"], [0, 1], height=h, width=w, **kw)
    b = generate_images(pipe, [PROMPT], [0], height=h, width=w, **kw)
    tall = generate_images(pipe, [PROMPT], [0], height=w, width=h, **kw)
    square = generate_images(pipe, [PROMPT], [0], **kw)
    assert [im.size for im in a] == [(w, h)] * 2 and tall[0].size == (h, w) and square[0].size == (EVAL_RES,) * 2
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # same prompt, seed and size: the same image
    with pytest.raises(ValueError, match="width=26 px is not a positive multiple of 8 px"):
        generate_images(pipe, [PROMPT], [0], height=h, width=26, **kw)


# ---------------------------------------------------------------- (d) eval run


def _eval_cfg(model, out, suite, **kw):
    from t2i_recap.evaluate.run import EvalConfig

    return from_dict(EvalConfig, dict(model=str(model), out=str(out), suite=str(suite), images_per_prompt=1,
                                      batch_size=4, recaption="none") | kw)


def test_eval_run_generates_at_the_size_asked_and_a_new_size_regenerates(tmp_path, eval_pipeline_dir):
    from fixtures_eval import EVAL_RES

    from t2i_recap.evaluate.run import parse_args, run_eval

    suite = tmp_path / "prompts.txt"
    suite.write_text("a red circle\ntwo green triangles\n")
    out = tmp_path / "eval"
    h, w = EVAL_RES, 2 * EVAL_RES
    cli = parse_args(["--model", str(eval_pipeline_dir), "--out", str(out), "--height", str(h), "--width", str(w)])
    assert (cli.height, cli.width) == (h, w)
    sizes = {}
    for name, (hh, ww) in {"wide": (h, w), "tall": (w, h), "wide_again": (h, w)}.items():
        report = json.loads(run_eval(_eval_cfg(eval_pipeline_dir, out, suite, height=hh, width=ww)).read_text())
        sizes[name] = [Image.open(p).size for p in sorted((out / "images" / "raw").glob("*.png"))]
        assert report["timing"]["images_generated"] == {"raw": 2}, name  # another size: nothing reused
        assert (report["provenance"]["generation"]["height"], report["provenance"]["generation"]["width"]) == (hh, ww)
    assert sizes == {"wide": [(w, h)] * 2, "tall": [(h, w)] * 2, "wide_again": [(w, h)] * 2}
    again = json.loads(run_eval(_eval_cfg(eval_pipeline_dir, out, suite, height=h, width=w)).read_text())
    assert again["timing"]["images_generated"] == {"raw": 0}  # the same size: reused


def test_square_default_keeps_the_image_set_key(eval_pipeline_dir):
    from t2i_recap.evaluate.generate import GenSettings
    from t2i_recap.evaluate.imageset import set_key

    old = GenSettings(1, 0, 2, 2.0, 24, 32, 4)
    assert set_key("d", old, None) == set_key("d", GenSettings(1, 0, 2, 2.0, 24, 32, 4, None, 24, 24), None)
    assert "height" not in set_key("d", old, None)
    wide = set_key("d", GenSettings(1, 0, 2, 2.0, 24, 32, 4, None, 24, 48), None)
    assert (wide["height"], wide["width"]) == (24, 48)


def test_shapes_oracle_refuses_non_square_images(tmp_path, eval_pipeline_dir):
    from t2i_recap.evaluate.run import run_eval

    cfg = _eval_cfg(eval_pipeline_dir, tmp_path / "eval", "shapes", per_category=1, height=24, width=48)
    with pytest.raises(ValueError, match="shapes oracle .* reads only square images"):
        run_eval(cfg)
    assert not (tmp_path / "eval" / "images").exists()  # refused before generating


# ---------------------------------------------------------------- (e) the validation config


def test_validation_size_and_its_checks():
    assert validation_size(ValidationConfig(), 32) == (32, 32)
    assert validation_size(ValidationConfig(height=16, width=48), 32) == (16, 48)
    assert validation_size(ValidationConfig(width=64), 32) == (32, 64)
    with pytest.raises(ValueError, match="validation.height must be >= 8"):
        ValidationConfig(height=4)
    with pytest.raises(ValueError, match="validation.width must be >= 8"):
        ValidationConfig(width=0)
    check_size(16, 48, 16)
    check_size(16, 24, 4)
    with pytest.raises(ValueError, match="height=12 px is not a positive multiple of 8 px .*PixArtAlphaPipeline"):
        check_size(12, 24, 4)  # a whole number of 4 px patches, but the pipeline takes multiples of 8 only
    with pytest.raises(ValueError, match="validation: width=40 px is not a positive multiple of 16 px"):
        check_size(16, 40, 16, "validation")
