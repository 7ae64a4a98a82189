"""The real CLIP BPE vocabulary (open_clip_torch's file) as a transformers CLIPTokenizer folder."""

from __future__ import annotations

import pytest

# ids of open_clip's SimpleTokenizer / OpenAI CLIP (49406 = <|startoftext|>, 49407 = <|endoftext|>)
KNOWN = [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("A Dog, running on the beach!", [49406, 320, 1929, 267, 2761, 525, 518, 2117, 256, 49407]),
]


@pytest.mark.parametrize("text, ids", KNOWN)
def test_clip_tokenizer_from_the_open_clip_bpe_gives_clip_ids(real_clip_tokenizer_dir, text, ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_clip_tokenizer_dir))
    assert tok(text).input_ids == ids
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_the_vocabulary_is_built_in_open_clips_order(real_clip_tokenizer_dir):
    import json

    vocab = json.loads((real_clip_tokenizer_dir / "vocab.json").read_text())
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407
    assert len(set(vocab.values())) == len(vocab) == 49408
