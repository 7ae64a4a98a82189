"""The shapes world's tokenizer: a byte-level BPE over both caption kinds, CLIP-style specials.

Saved as a standard fast tokenizer folder (`tokenizer.json` + `tokenizer_config.json`), so
`AutoTokenizer.from_pretrained(DIR)` loads it exactly as it loads a hub tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from t2i_recap.shapes.captions import GOLD_TEMPLATES, gold_caption, web_caption
from t2i_recap.shapes.world import sample_scene

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 77


def caption_corpus(num_scenes: int = 4000, seed: int = 1234) -> list[str]:
    """Gold captions in every template plus web alt-texts, for tokenizer training."""
    rng = random.Random(seed)
    out = []
    for i in range(num_scenes):
        scene = sample_scene(rng)
        out.append(gold_caption(scene, rng, GOLD_TEMPLATES[i % len(GOLD_TEMPLATES)]))
        out.append(web_caption(scene, rng))
    return out


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the BPE (deterministic for a fixed corpus) and, when `out_dir` is given, save it."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # as in OpenAI CLIP
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
