"""The captioner's preallocated KV cache and in-memory models: greedy tokens equal plain `generate`."""

from __future__ import annotations

import pytest
import torch

from test_captioner_backend import _images_and_prompts


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def folder(request, tiny_llava_dir, tiny_idefics3_dir):
    return {"llava": tiny_llava_dir, "idefics3": tiny_idefics3_dir}[request.param]


def _plain_generate(backend, images, prompts, max_new_tokens):
    """The model's own generate on the backend's inputs, with transformers' default (dynamic) cache."""
    inputs = backend._inputs(images, prompts)
    with torch.inference_mode():
        out = backend.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=backend.tokenizer.pad_token_id, eos_token_id=sorted(backend.stop_ids))
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_static_cache_gives_the_tokens_of_plain_generate(folder):
    from t2i_recap.captioner.backend import TransformersBackend

    images, prompts = _images_and_prompts()
    static = TransformersBackend(str(folder), kv_cache="static")
    dynamic = TransformersBackend(str(folder))
    plain = [static._generation(row, 16) for row in _plain_generate(dynamic, images, prompts, 16)]
    got = static.caption(images, prompts, max_new_tokens=16)
    assert got == plain == dynamic.caption(images, prompts, max_new_tokens=16)
    assert any(g.finish_reason == "length" for g in got)  # the cap is reached: the preallocated end is used
    assert static.describe()["kv_cache"] == "static"


def test_from_model_captions_as_the_loaded_folder(folder):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from t2i_recap.captioner.backend import TransformersBackend

    loaded = TransformersBackend(str(folder))
    config = AutoConfig.from_pretrained(str(folder))
    built = AutoModelForImageTextToText.from_config(config)  # built in memory, as a benchmark builds an 8B model
    built.load_state_dict(loaded.model.state_dict())
    built.generation_config = loaded.model.generation_config
    backend = TransformersBackend.from_model(built, AutoProcessor.from_pretrained(str(folder)), model_id="in-memory")
    images, prompts = _images_and_prompts(3)
    assert backend.caption(images, prompts, max_new_tokens=12) == loaded.caption(images, prompts, max_new_tokens=12)
    assert backend.describe()["model"] == "in-memory" and backend.dtype == torch.float32


def test_bad_kv_cache_is_refused(tiny_llava_dir):
    from t2i_recap.captioner.backend import TransformersBackend

    with pytest.raises(ValueError, match="kv_cache must be one of"):
        TransformersBackend(str(tiny_llava_dir), kv_cache="paged")
