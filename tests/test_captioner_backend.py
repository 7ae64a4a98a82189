"""The transformers backend on tiny random models saved in HF format (LLaVA and Idefics3 families)."""

from __future__ import annotations

import random

import pytest
from PIL import Image


def _images_and_prompts(n: int = 5):
    rng = random.Random(0)
    images = [Image.new("RGB", (rng.randint(20, 70), rng.randint(20, 70)), tuple(rng.randrange(256) for _ in range(3)))
              for _ in range(n)]
    # Different prompt lengths: the batch is padded, so left padding has to be right for equality.
    prompts = ["Describe." + " Be very precise." * i for i in range(n)]
    return images, prompts


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def backend(request, tiny_llava_dir, tiny_idefics3_dir):
    from t2i_recap.captioner.backend import TransformersBackend

    folder = {"llava": tiny_llava_dir, "idefics3": tiny_idefics3_dir}[request.param]
    return TransformersBackend(str(folder))


def test_batched_equals_one_at_a_time(backend):
    images, prompts = _images_and_prompts()
    batched = backend.caption(images, prompts, max_new_tokens=12)
    single = [backend.caption([im], [p], max_new_tokens=12)[0] for im, p in zip(images, prompts)]
    assert batched == single
    assert all(g.finish_reason in ("stop", "length") and 0 <= g.num_tokens <= 12 for g in batched)
    assert backend.tokenizer.padding_side == "left"
    assert len({g.text for g in batched}) > 1  # the image and prompt do reach the model


def test_inputs_are_left_padded(backend):
    images, prompts = _images_and_prompts(2)
    inputs = backend._inputs(images, prompts)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]  # the short prompt is padded on the left


def test_yes_probability(backend):
    images, _ = _images_and_prompts(3)
    questions = ["Is there a red circle?", "Does this image show two blue squares at the top?", "Yes or no?"]
    batched = backend.yes_probability(images, questions)
    single = [backend.yes_probability([im], [q])[0] for im, q in zip(images, questions)]
    assert all(0.0 < p < 1.0 for p in batched)
    assert batched == pytest.approx(single, abs=1e-5)


def test_finish_reason_and_token_count(backend):
    eos = next(iter(backend.stop_ids))
    other = next(i for i in range(5, 50) if i not in backend.stop_ids)
    assert backend._generation([other, other, eos, eos], 4).finish_reason == "stop"
    assert backend._generation([other, other, eos, eos], 4).num_tokens == 2
    hit = backend._generation([other] * 4, 4)
    assert (hit.finish_reason, hit.num_tokens) == ("length", 4)


def test_describe_names_model_and_settings(backend):
    info = backend.describe()
    assert info["backend"] == "transformers" and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["attn_implementation"] == "sdpa"


def test_qwen2vl_family(tmp_path, shapes_tokenizer_dir):
    pytest.importorskip("torchvision", reason="Qwen2-VL's processor (video part) needs torchvision")
    from t2i_recap.captioner.backend import TransformersBackend
    from t2i_recap.captioner.tiny import tiny_qwen2vl

    backend = TransformersBackend(str(tiny_qwen2vl(tmp_path / "qwen", tokenizer_dir=shapes_tokenizer_dir)))
    images, prompts = _images_and_prompts(3)
    assert backend.caption(images, prompts, 8) == [backend.caption([i], [p], 8)[0] for i, p in zip(images, prompts)]


def test_unknown_backend_and_model_errors(tmp_path):
    from t2i_recap.captioner.backend import make_backend, resolve_dtype

    with pytest.raises(ValueError, match="unknown captioning backend"):
        make_backend("vllm-but-not-installed", "m")
    with pytest.raises(ValueError, match="unknown dtype"):
        import torch

        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_defaults_to_bf16_and_sdpa(tiny_llava_dir):
    import torch

    from t2i_recap.captioner.backend import TransformersBackend

    backend = TransformersBackend(str(tiny_llava_dir), device="cuda")
    assert backend.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert backend.describe()["attn_implementation"] == "sdpa"
    images, prompts = _images_and_prompts(4)
    gens = backend.caption(images, prompts, max_new_tokens=8)
    assert len(gens) == 4 and all(g.num_tokens <= 8 for g in gens)
