"""Captions longer than CLIP's 77 tokens, encoded in chunks.

CLIP has 77 position rows, and recaptions run past them (the paper's average recaption is ~49
words, many over 77 tokens: docs/references.md section 1). kohya-ss/sd-scripts (`max_token_length`
150/225) and OneTrainer split the caption's tokens into chunks of 75, wrap each in its own
start and end token, encode the chunks separately and concatenate the hidden states. Here each
chunk keeps its full 77 rows and its own padding mask, so:

- a caption of at most 75 tokens gives exactly the plain encoding in its first 77 rows, and
  masked rows after it: a chunk-trained model sees short prompts as a plain one would;
- only chunks that hold tokens are unmasked; captions beyond `chunks * 75` tokens are cut, and
  that is reported (the `truncated` flags), never hidden.
"""

from __future__ import annotations

import torch


def _special_ids(tokenizer) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no start/end tokens: chunked encoding needs a CLIP tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def chunk_token_ids(tokenizer, texts: list[str], chunks: int, chunk_len: int = 77
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (B * chunks, chunk_len) and the model's mask for them, the (B, chunks) bool of
    chunks that hold tokens (chunk 0 always does), and (B,) bool: was the caption cut."""
    if chunks < 1 or chunk_len < 3:
        raise ValueError(f"need chunks >= 1 and chunk_len >= 3, got {chunks} and {chunk_len}")
    bos, eos, pad = _special_ids(tokenizer)
    body = chunk_len - 2
    rows = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    ids = torch.full((len(texts), chunks, chunk_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), chunks, chunk_len), dtype=torch.long)
    used = torch.zeros((len(texts), chunks), dtype=torch.bool)
    for b, row in enumerate(rows):
        for c in range(chunks):
            piece = row[c * body:(c + 1) * body]
            if c > 0 and not piece:
                break
            ids[b, c, :len(piece) + 2] = torch.tensor([bos, *piece, eos])
            mask[b, c, :len(piece) + 2] = 1
            used[b, c] = True
    truncated = torch.tensor([len(row) > chunks * body for row in rows], dtype=torch.bool)
    return ids.view(-1, chunk_len), mask.view(-1, chunk_len), used, truncated


@torch.no_grad()
def encode_chunks(tokenizer, model, texts: list[str], chunks: int, chunk_len: int = 77
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, chunks * chunk_len, D) last hidden states, (B, chunks * chunk_len) mask, (B,) truncated.

    Chunks without tokens are zero and masked out; the model runs only on those with tokens."""
    ids, mask, used, truncated = chunk_token_ids(tokenizer, texts, chunks, chunk_len)
    device = next(model.parameters()).device
    keep = used.view(-1)
    hidden = model(ids[keep].to(device), attention_mask=mask[keep].to(device))[0]  # (N_used, chunk_len, D)
    out = hidden.new_zeros((ids.shape[0], chunk_len, hidden.shape[-1]))
    out[keep.to(device)] = hidden
    out_mask = (mask * keep[:, None]).view(len(texts), chunks * chunk_len)
    return out.view(len(texts), chunks * chunk_len, -1), out_mask.to(device), truncated
