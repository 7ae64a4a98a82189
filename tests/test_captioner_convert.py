"""The original-LLaVA (llava_llama) -> transformers converter, checked against the original weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from fixtures_captioner import write_original_llava


def _expand2square(img: Image.Image, background) -> Image.Image:
    """haotian-liu/LLaVA llava/mm_utils.py expand2square, the `image_aspect_ratio: pad` preprocessing."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return out


@pytest.fixture(scope="module")
def converted(original_llava, tmp_path_factory):
    from t2i_recap.captioner.convert_llava import convert

    out = tmp_path_factory.mktemp("converted")
    report = convert(original_llava.src, out)
    return out, report


def test_every_tensor_maps_once(original_llava, converted):
    out, report = converted
    assert report["source_tensors"] == original_llava.num_tensors
    assert report["mapped"] + len(report["dropped"]) == report["source_tensors"]
    assert report["vision_tower_from_checkpoint"] is True
    assert json.loads((out / "conversion.json").read_text())["mapped"] == report["mapped"]


def test_logits_match_the_original_computation(original_llava, converted):
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration

    out, _ = converted
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = Image.new("RGB", (40, 24), (30, 160, 60))
    image.paste((220, 30, 30), (5, 5, 20, 20))
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "describe it"}]}]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           processor_kwargs={"return_tensors": "pt"})
    # Preprocessing as the original: pad to a square with the mean colour, then CLIP's transform.
    clip = CLIPImageProcessor.from_pretrained(original_llava.tower_dir)
    mean = tuple(int(x * 255) for x in clip.image_mean)
    ref_pixels = clip(_expand2square(image, mean), return_tensors="pt").pixel_values
    torch.testing.assert_close(inputs["pixel_values"], ref_pixels, atol=1e-5, rtol=0)

    ids = inputs["input_ids"][0]
    where = (ids == model.config.image_token_index).nonzero().flatten()
    assert len(where) == 16 and (where.diff() == 1).all()  # (32/8)^2 patches, CLS dropped
    with torch.no_grad():
        feats = original_llava.tower(ref_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        image_embeds = original_llava.projector(feats)[0]
        embed = original_llava.llama.model.embed_tokens
        pieces = [embed(ids[: where[0]]), image_embeds, embed(ids[where[-1] + 1:])]
        ref = original_llava.llama(inputs_embeds=torch.cat(pieces)[None]).logits
        got = model(**inputs).logits
    vocab = original_llava.llama.config.vocab_size
    torch.testing.assert_close(got[..., :vocab], ref, atol=1e-5, rtol=1e-4)


def test_converted_model_captions_through_the_backend(converted):
    from t2i_recap.captioner.backend import TransformersBackend

    out, report = converted
    backend = TransformersBackend(str(out))
    gens = backend.caption([Image.new("RGB", (32, 32), (0, 0, 200))] * 2, ["describe", "describe it"], max_new_tokens=6)
    assert len(gens) == 2 and all(g.num_tokens <= 6 for g in gens)
    assert backend.model.generation_config.suppress_tokens == [report["image_token_id"]]


def test_tower_loaded_from_mm_vision_tower_when_absent(tmp_path, shapes_tokenizer_dir):
    from t2i_recap.captioner.convert_llava import convert

    orig = write_original_llava(tmp_path / "src", shapes_tokenizer_dir, include_tower=False)
    report = convert(orig.src, tmp_path / "out")
    assert report["vision_tower_from_checkpoint"] is False


def test_leftover_and_unsupported_checkpoints_fail(original_llava, tmp_path):
    from safetensors.torch import load_file, save_file

    from t2i_recap.captioner.convert_llava import ConversionError, convert

    src = tmp_path / "extra"
    shutil.copytree(original_llava.src, src)
    state = load_file(src / "model.safetensors")
    state["model.mystery_adapter.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="mystery_adapter"):
        convert(src, tmp_path / "out1")

    src2 = tmp_path / "linear"
    shutil.copytree(original_llava.src, src2)
    cfg = json.loads((src2 / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (src2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="mlp2x_gelu"):
        convert(src2, tmp_path / "out2")

    with pytest.raises(ConversionError, match="not an original-LLaVA"):
        convert(original_llava.tower_dir, tmp_path / "out3")


def test_convert_command(original_llava, tmp_path, capsys):
    from t2i_recap.cli import main

    assert main(["caption", "convert", "--src", str(original_llava.src), "--out", str(tmp_path / "hf"),
                 "--chat-template", "vicuna_v1", "--system-prompt", ""]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] == "vicuna_v1"
    assert (tmp_path / "hf" / "config.json").exists()
    assert main(["caption", "convert", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
