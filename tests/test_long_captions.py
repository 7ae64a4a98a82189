"""Captions beyond CLIP's 77 tokens, encoded in chunks (text_encoder.long_captions=chunks):
over the real CLIP vocabulary, then through train -> export -> generation."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_train import train_config_dict
from t2i_recap.config import from_dict
from t2i_recap.text_encoders import TextEncoder, TextEncoderConfig
from t2i_recap.train_config import TrainConfig

SHORT = "a photo of a red circle next to a blue square"
# 170 tokens: the paper's recaptions run this long (docs/references.md section 1)
LONG = ("The image shows a large red circle in the upper left corner of a plain white background, "
        "with a small blue square directly beneath it and a green triangle to its right. ") * 5


@pytest.fixture(scope="module")
def real_vocab_clip(tmp_path_factory, real_clip_tokenizer_dir):
    """A random 1-layer CLIPTextModel over the real CLIP BPE vocabulary, saved as a hub folder."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(real_clip_tokenizer_dir))
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("real_vocab_clip")
    CLIPTextModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _encoder(path, **kw) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(name_or_path=str(path), **kw))


def test_a_short_caption_encodes_exactly_as_the_plain_encoder(real_vocab_clip):
    plain, chunked = _encoder(real_vocab_clip), _encoder(real_vocab_clip, long_captions="chunks", max_chunks=3)
    assert (plain.max_length, chunked.max_length) == (77, 231)
    pe, pm, pt = plain.encode([SHORT])
    ce, cm, ct = chunked.encode([SHORT])
    assert ce.shape == (1, 231, 32) and cm.shape == (1, 231)
    assert torch.equal(cm[:, :77], pm) and cm[:, 77:].sum() == 0
    keep = pm[0].bool()
    torch.testing.assert_close(ce[0, :77][keep], pe[0][keep], rtol=0, atol=1e-6)
    assert not pt.any() and not ct.any()


def test_a_long_caption_is_kept_in_chunks_and_each_chunk_is_its_own_clip_encoding(real_vocab_clip):
    tok_ids = _encoder(real_vocab_clip).tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert 150 < len(tok_ids) <= 225  # three chunks of 75 hold it; one does not
    plain, chunked = _encoder(real_vocab_clip), _encoder(real_vocab_clip, long_captions="chunks", max_chunks=3)
    _, _, cut_plain = plain.encode([LONG])
    emb, mask, cut = chunked.encode([LONG])
    assert cut_plain.tolist() == [True] and cut.tolist() == [False]  # truncation reported either way
    assert mask[0].sum() == len(tok_ids) + 2 * 3  # every token, plus a start and an end token per chunk
    # the second chunk equals encoding tokens 75..149 alone, with their own start and end token
    piece = plain.tokenizer.decode(tok_ids[75:150])
    assert plain.tokenizer(piece, add_special_tokens=False)["input_ids"] == tok_ids[75:150]
    alone, alone_mask, _ = plain.encode([piece])
    keep = alone_mask[0].bool()
    torch.testing.assert_close(emb[0, 77:154][keep], alone[0][keep], rtol=0, atol=1e-6)


def test_a_caption_beyond_every_chunk_is_cut_and_reported(real_vocab_clip):
    two = _encoder(real_vocab_clip, long_captions="chunks", max_chunks=2)
    emb, mask, cut = two.encode([LONG, SHORT])
    assert cut.tolist() == [True, False]
    assert mask[0].sum() == 2 * 77 and emb.shape[1] == 154


def test_chunks_need_clip_and_sane_settings(tmp_path, shapes_tokenizer_dir):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(shapes_tokenizer_dir))
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
                   ).save_pretrained(str(tmp_path / "t5"))
    tok.save_pretrained(str(tmp_path / "t5"))
    with pytest.raises(ValueError, match="long_captions=chunks is for CLIP"):
        _encoder(tmp_path / "t5", long_captions="chunks")
    with pytest.raises(ValueError, match="max_chunks"):
        TextEncoderConfig(long_captions="chunks", max_chunks=0)
    from t2i_recap.config import ConfigError

    with pytest.raises(ConfigError, match="long_captions"):
        from_dict(TextEncoderConfig, {"long_captions": "split"})


@pytest.mark.usefixtures("one_thread")
def test_a_chunk_trained_model_exports_and_generates_with_its_encoding(tmp_path, train_assets, train_shards):
    """Chunks of 8 rows (6 caption tokens) so the shapes captions span several: train, then the export
    records the chunking, t2i-recap's generation encodes in chunks and the plain call still runs."""
    from diffusers import DiffusionPipeline

    from t2i_recap.export import main as export_main
    from t2i_recap.generation import generate_from_settings, load_pipeline
    from t2i_recap.trainer import train

    shards, side = train_shards
    run = tmp_path / "run"
    raw = train_config_dict(train_assets, shards, run, side, trainer={"max_steps": 2},
                            text_encoder={"max_length": 8, "long_captions": "chunks", "max_chunks": 4},
                            validation={"every_steps": 2})
    summary = train(from_dict(TrainConfig, raw))
    assert summary["step"] == 2 and (run / "samples" / "step-00000002.png").is_file()
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    settings = json.loads((out / "t2i_recap.json").read_text())
    assert settings["text_chunks"] == 4 and settings["max_sequence_length"] == 32
    assert "max_sequence_length=8," in (out / "README.md").read_text()  # the plain call cuts at one chunk
    pipe, settings = load_pipeline(out)
    prompt = "two blue squares above a large red circle and a small green triangle"
    a = generate_from_settings(pipe, settings, [prompt], [0], num_inference_steps=2)
    b = generate_from_settings(pipe, settings, [prompt], [0], num_inference_steps=2, text_chunks=None,
                               max_sequence_length=8)
    assert a[0].size == b[0].size
    assert a[0].tobytes() != b[0].tobytes()  # the later chunks reach the model
    plain = DiffusionPipeline.from_pretrained(str(out))
    plain.set_progress_bar_config(disable=True)
    img = plain(prompt, num_inference_steps=2, use_resolution_binning=False, max_sequence_length=8).images[0]
    assert img.size == a[0].size
