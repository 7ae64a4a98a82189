"""`t2i-recap caption finetune`: tiny LLaVA assembly, answer-only loss, full and LoRA training,
standard transformers folders that the captioning backend loads."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from fixtures_captioner_train import FAST_FINETUNE
from t2i_recap.captioner import finetune, finetune_config, finetune_data, finetune_model
from t2i_recap.config import load_config


def _cfg(shards, clip, *extra):
    return load_config(finetune_config.FinetuneConfig, None,
                       [f"data.shards={shards}", f"build.clip={clip}", *FAST_FINETUNE, *extra])


def test_built_captioner_keeps_the_clip_vision_tower(captioner_clip_dir):
    from transformers import CLIPVisionModel

    model, processor = finetune_model.build_captioner(_cfg("x", captioner_clip_dir).build)
    clip = CLIPVisionModel.from_pretrained(str(captioner_clip_dir)).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(clip[k], tower[k]) for k in clip)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.tokenizer.pad_token is not None and processor.tokenizer.padding_side == "left"
    ids = processor.tokenizer("a red circle")["input_ids"]
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] != processor.tokenizer.eos_token_id


def test_labels_cover_the_answer_only_and_prompt_matches_the_backend(shapes_shards, captioner_clip_dir, tmp_path):
    """The training prompt tokens are exactly what TransformersBackend feeds at captioning time."""
    from t2i_recap.captioner.backend import TransformersBackend
    from t2i_recap.captioner.prompts import RECAP_PROMPT

    cfg = _cfg(shapes_shards, captioner_clip_dir)
    pairs, _ = finetune_data.read_pairs(cfg.data)
    model, processor = finetune_model.build_captioner(cfg.build)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    batcher = finetune_data.Batcher(processor, "recap", cfg.train.max_length)
    examples = batcher.encode(pairs[:3])
    batch = batcher.collate(examples)
    tok = processor.tokenizer
    for i, (pair, ex) in enumerate(zip(pairs[:3], examples)):
        answer = tok(" " + pair.caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][i]
        assert labels[: ex.num_prompt].eq(-100).all()
        assert labels[labels != -100].tolist() == answer
        assert batch["attention_mask"][i].sum() == ex.num_prompt + len(answer)
    backend = TransformersBackend(str(tmp_path), device="cpu")
    served = backend._inputs([pairs[0].image], [RECAP_PROMPT])["input_ids"][0].tolist()
    assert served == examples[0].input_ids[: examples[0].num_prompt]
    assert torch.allclose(backend._inputs([pairs[0].image], [RECAP_PROMPT])["pixel_values"][0], examples[0].pixel_values)


def test_answer_only_logits_give_transformers_own_loss(shapes_shards, captioner_clip_dir):
    """`forward` projects only the labelled positions to the vocabulary; the loss must be the one
    LlavaForConditionalGeneration computes over every position, with pixels or cached features."""
    cfg = _cfg(shapes_shards, captioner_clip_dir)
    pairs, _ = finetune_data.read_pairs(cfg.data)
    model, processor = finetune_model.build_captioner(cfg.build)
    batcher = finetune_data.Batcher(processor, "recap", cfg.train.max_length)
    examples = batcher.encode(pairs[:4])
    with torch.no_grad():
        batch = batcher.collate(examples)
        reference = model(**batch).loss
        assert reference.item() > 0
        torch.testing.assert_close(finetune_model.forward(model, batch), reference, rtol=1e-5, atol=1e-6)
        finetune_model.cache_vision_features(model, examples)
        cached = batcher.collate(examples)
        assert "vision_features" in cached and "pixel_values" not in cached
        torch.testing.assert_close(finetune_model.forward(model, cached), reference, rtol=1e-5, atol=1e-6)


def test_device_setting(monkeypatch):
    assert finetune_config.TrainSettings(device="cpu").resolved_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finetune_config.TrainSettings().resolved_device() == torch.device("cpu")  # auto without a GPU
    with pytest.raises(ValueError, match="train.device='cuda'.*no CUDA"):
        finetune_config.TrainSettings(device="cuda").resolved_device()
    with pytest.raises(ValueError, match="mixed_precision"):
        finetune_config.TrainSettings(mixed_precision="fp8")


def test_finetune_cli_saves_a_standard_folder_that_generates(shapes_shards, captioner_clip_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from t2i_recap.captioner.backend import TransformersBackend

    out = tmp_path / "captioner"
    args = ["--shards", str(shapes_shards), "--clip", str(captioner_clip_dir), "--out", str(out)]
    sets = [a for s in FAST_FINETUNE for a in ("--set", s)]
    assert finetune.main(args + sets) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["pairs"] == 16 and summary["steps"] == 2  # 16 curated of 64, batch 8
    assert summary["epochs_run"] == 1
    assert summary["skipped"]["not curated"] == 48
    model = LlavaForConditionalGeneration.from_pretrained(str(out))
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(processor).__name__ == "LlavaProcessor" and processor.chat_template
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    gens = TransformersBackend(str(out), device="cpu").caption(
        [finetune_data.read_pairs(_cfg(shapes_shards, captioner_clip_dir).data)[0][0].image] * 2, ["x", "x"],
        max_new_tokens=5)
    assert len(gens) == 2 and all(g.num_tokens <= 5 for g in gens)
    assert model.config.text_config.num_hidden_layers == 1
    # A rerun finds the finished folder and leaves it alone.
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert finetune.main(args + sets) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_training_fits_a_few_captions(shapes_shards, captioner_clip_dir, tmp_path):
    """Answer loss falls far on 8 pairs: labels, masks and the optimizer are wired right."""
    cfg = _cfg(shapes_shards, captioner_clip_dir, "data.max_samples=8", "train.epochs=30", "train.lr=1e-2",
               "train.warmup_steps=2")
    summary = finetune.finetune(cfg, tmp_path / "fit")
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary


def test_lora_merged_and_kept_adapter(shapes_shards, captioner_clip_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    cfg = _cfg(shapes_shards, captioner_clip_dir, "lora.enabled=true", "lora.r=4", "lora.merge=false",
               "train.lr=1e-2", "train.epochs=2")
    base, _ = finetune_model.build_captioner(cfg.build)
    summary = finetune.finetune(cfg, tmp_path / "lora")
    assert summary["lora"] == "merged + adapter/"
    merged = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "lora"))
    names = [n for n, _ in merged.named_parameters()]
    assert not any("lora_" in n for n in names)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_sd[q], merged_sd[q])  # adapters merged into the decoder
    v = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(base_sd[v], merged_sd[v])  # no adapters and no updates in the frozen tower
    p = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(base_sd[p], merged_sd[p])  # the projector trains in full
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    wrapped = PeftModel.from_pretrained(base, str(tmp_path / "lora" / "adapter"))
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_with_their_reason(shapes_shards, tmp_path):
    src = sorted(shapes_shards.glob("*.tar"))[0]
    with tarfile.open(src) as tar:
        good = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    curated = json.loads(next(d for n, d in good if n.endswith(".json") and json.loads(d).get("curated")))
    bad_json = json.dumps({**curated, "key": "bad000001"}).encode()
    no_caption = json.dumps({**curated, "key": "bad000002", "gold_caption": None}).encode()
    _write_tar(tmp_path / "00000.tar", good + [
        ("bad000001.png", b"not a png"), ("bad000001.json", bad_json),
        ("bad000002.png", next(d for n, d in good if n.endswith(".png"))), ("bad000002.json", no_caption),
        ("bad000003.png", b""), ("bad000003.json", b"{not json"),
    ])
    cfg = finetune_config.FinetuneDataConfig(shards=str(tmp_path))
    pairs, skipped = finetune_data.read_pairs(cfg)
    assert len(pairs) == 8  # the 8 curated samples of the copied shard
    reasons = " | ".join(skipped)
    assert "not a recognised image format" in reasons and "no caption in field 'gold_caption'" in reasons
    assert "unreadable json" in reasons


def test_a_list_field_gives_one_pair_per_caption(tmp_path):
    from t2i_recap.shapes.make import make_dataset

    make_dataset(tmp_path / "shards", 16, curated_fraction=0.25, gold_captions=3, progress=False)
    pairs, _ = finetune_data.read_pairs(finetune_config.FinetuneDataConfig(shards=str(tmp_path / "shards"), caption_field="gold_captions"))
    assert len(pairs) == 4 * 3 and len({p.key for p in pairs}) == 4
    by_key = {}
    for p in pairs:
        by_key.setdefault(p.key, []).append(p.caption)
    assert all(len(set(c)) > 1 for c in by_key.values())  # other wordings of one image
    single, _ = finetune_data.read_pairs(finetune_config.FinetuneDataConfig(shards=str(tmp_path / "shards")))
    assert [p.caption for p in single] == [c[0] for c in by_key.values()]


def test_bad_config_values_name_the_key(tmp_path):
    from t2i_recap.config import ConfigError

    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(finetune_config.FinetuneConfig, None, ["build.hidden_size=30", "build.num_heads=4"])
    with pytest.raises(ConfigError, match="nothing|lr"):
        load_config(finetune_config.FinetuneConfig, None, ["train.lr=0"])
    with pytest.raises(ValueError, match="--shards"):
        finetune_data.read_pairs(finetune_config.FinetuneDataConfig())


def test_max_steps_cuts_the_schedule():
    o = finetune_config.TrainSettings(epochs=3, batch_size=4, max_steps=5)
    got = list(finetune.batches(list(range(10)), o))
    assert len(got) == finetune.num_steps(10, o) == 5 and [e for e, _ in got] == [0, 0, 0, 1, 1]
    o = finetune_config.TrainSettings(epochs=2, batch_size=4)
    got = list(finetune.batches(list(range(10)), o))
    assert finetune.num_steps(10, o) == len(got) == 6
    assert sorted(j for e, idx in got if e == 1 for j in idx) == list(range(10))  # every pair once per epoch


def test_clip_tokenizer_truncation_defaults_never_cut_the_prompt(captioner_clip_dir, tmp_path):
    """The real tiny CLIP's tokenizer carries `max_length: 77` + truncation defaults; the processor
    applied them to the image + prompt sequence, so training saw prompts cut after ~13 text tokens
    while captioning saw whole ones. The captioner's tokenizer must drop them."""
    import shutil

    from PIL import Image

    from t2i_recap.captioner.prompts import RECAP_PROMPT

    clip = tmp_path / "clip"
    shutil.copytree(captioner_clip_dir, clip)
    tok_cfg = json.loads((clip / "tokenizer_config.json").read_text())
    tok_cfg.update(max_length=20, truncation_strategy="longest_first")
    (clip / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    model, processor = finetune_model.build_captioner(_cfg("x", clip).build)
    enc = finetune_data.encode_prompts(processor, [Image.new("RGB", (32, 32))], [RECAP_PROMPT])
    assert len(enc["input_ids"][0]) == finetune_data._expected_lengths(processor, [[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": RECAP_PROMPT}]}]])[0] > 40
    processor.save_pretrained(tmp_path / "saved")
    assert "max_length" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
