"""A faster forward for diffusers' PixArtTransformer2DModel that keeps its weights and keys.

The module tree stays diffusers' own (same parameters, same state-dict keys and shapes); only the
forward of the model and of its blocks changes, by swapping the instances' classes in place (the
way torch.nn.utils.parametrize swaps a module's class), so checkpoints and the export stay a plain
PixArtTransformer2DModel. What the fast forward does differently:
  - self-attention: one matmul for Q, K and V (the three weights concatenated on the fly);
  - cross-attention: the caption tokens are the same for every block, so all blocks' K and V are one
    batched matmul of the projected caption (B, L, D) by all blocks' to_k/to_v weights at once;
  - attention through torch.nn.functional.scaled_dot_product_attention with the padding mask as a
    boolean mask (diffusers adds a -10000 bias, which gives the masked keys the same zero weight in
    fp32 but keeps SDPA off its fused kernels when a float mask is given);
  - optionally a bf16 residual stream (activations between blocks in bf16; the weights, the AdamW
    state and the EMA stay fp32, and matmuls run under autocast as before).
In fp32 it matches PixArtTransformer2DModel to float rounding (tests/test_fast_dit.py), at any
latent height and width, non-square ones too (tests/test_sizes.py): the patch embedding is
diffusers' own PatchEmbed, which recomputes its sincos position table for a grid other than the
trained one, and the output is unpatchified to the input's (height, width).
Inputs the fast path does not cover (a self-attention mask, cross_attention_kwargs, an already
converted mask bias, additional conditions) go through diffusers' own forward.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) queries against (B, M, D) keys/values -> (B, N, D); `mask` (B, 1, 1, M) bool, True = attend."""
    b, n, d = q.shape
    q = q.view(b, n, heads, d // heads).transpose(1, 2)
    k = k.view(b, -1, heads, d // heads).transpose(1, 2)
    v = v.view(b, -1, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, n, d).to(q.dtype)


class FastPixArtBlock(BasicTransformerBlock):
    """A PixArt block (ada_norm_single) whose cross-attention K/V arrive precomputed.

    Same call signature as diffusers' block: given `encoder_hidden_states` as the (K, V) pair of this
    block and `encoder_attention_mask` as a boolean (B, 1, 1, L) mask it runs the fast path; given
    anything else, diffusers' own forward.
    """

    residual_dtype: torch.dtype = torch.float32

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states=None, encoder_attention_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                class_labels=None, added_cond_kwargs: dict | None = None) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        (text_k, text_v), text_mask, residual_dtype = encoder_hidden_states, encoder_attention_mask, self.residual_dtype
        b = hidden_states.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(b, 6, -1)).chunk(6, dim=1)
        x = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        a = self.attn1
        qkv = F.linear(x, torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]),
                       torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
        q, k, v = qkv.chunk(3, dim=-1)
        attn = a.to_out[0](_attention(q, k, v, a.heads, None))
        hidden_states = (gate_msa * attn + hidden_states).to(residual_dtype)
        c = self.attn2  # PixArt applies no norm before cross-attention
        q = c.to_q(hidden_states.to(c.to_q.weight.dtype))  # a bf16 stream meets fp32 weights outside autocast
        attn = c.to_out[0](_attention(q, text_k.to(q.dtype), text_v.to(q.dtype), c.heads, text_mask))
        hidden_states = (attn + hidden_states).to(residual_dtype)
        x = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return (gate_mlp * self.ff(x) + hidden_states).to(residual_dtype)


class FastPixArtTransformer2DModel(PixArtTransformer2DModel):
    """PixArtTransformer2DModel with the fast forward; made by `make_fast`, never built directly."""

    residual_dtype: torch.dtype = torch.float32

    def to_json_string(self) -> str:
        # A save_pretrained of this instance writes the plain class: the weights are diffusers' own.
        config = json.loads(super().to_json_string())
        config["_class_name"] = PixArtTransformer2DModel.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _covered(self, attention_mask, encoder_attention_mask, cross_attention_kwargs) -> bool:
        return (attention_mask is None and not cross_attention_kwargs and not self.use_additional_conditions
                and (encoder_attention_mask is None or encoder_attention_mask.ndim == 2)
                and all(isinstance(b, FastPixArtBlock) for b in self.transformer_blocks))

    def text_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention (K, V) of the projected caption `text` (B, L, D), in one matmul."""
        attns = [b.attn2 for b in self.transformer_blocks]
        weight = torch.cat([w for a in attns for w in (a.to_k.weight, a.to_v.weight)])
        bias = torch.cat([w for a in attns for w in (a.to_k.bias, a.to_v.bias)])
        kv = F.linear(text, weight, bias).chunk(2 * len(attns), dim=-1)  # (B, L, D) each
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(len(attns))]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.LongTensor | None = None, added_cond_kwargs: dict | None = None,
                cross_attention_kwargs: dict | None = None, attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        if not self._covered(attention_mask, encoder_attention_mask, cross_attention_kwargs):
            return super().forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs,
                                   cross_attention_kwargs, attention_mask, encoder_attention_mask, return_dict)
        text_mask = None
        if encoder_attention_mask is not None:  # 1 = keep, 0 = padding -> (B, 1, 1, L) bool
            text_mask = (encoder_attention_mask > 0.5)[:, None, None, :]
        b = hidden_states.shape[0]
        p = self.config.patch_size
        height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        x = self.pos_embed(hidden_states)  # (B, T, D)
        timestep, embedded_timestep = self.adaln_single(timestep, added_cond_kwargs, batch_size=b,
                                                        hidden_dtype=x.dtype)
        text = self.caption_projection(encoder_hidden_states).view(b, -1, x.shape[-1])  # (B, L, D)
        x = x.to(self.residual_dtype)
        for block, kv in zip(self.transformer_blocks, self.text_kv(text)):
            if torch.is_grad_enabled() and self.gradient_checkpointing:  # diffusers' non-reentrant checkpoint
                x = self._gradient_checkpointing_func(block, x, None, kv, text_mask, timestep)
            else:
                x = block(x, None, kv, text_mask, timestep)
        x = x.float() if self.residual_dtype != torch.float32 else x
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(-1, height, width, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        output = x.reshape(-1, self.out_channels, height * p, width * p)
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)


def make_fast(model: PixArtTransformer2DModel, residual_dtype: torch.dtype = torch.float32) -> PixArtTransformer2DModel:
    """Switch `model` (in place: no weights copied, keys unchanged) to the fast forward."""
    if type(model) not in (PixArtTransformer2DModel, FastPixArtTransformer2DModel):
        raise TypeError(f"model.fast_blocks: expected a PixArtTransformer2DModel, got {type(model).__name__}")
    for block in model.transformer_blocks:
        if type(block) not in (BasicTransformerBlock, FastPixArtBlock) or block.norm_type != "ada_norm_single" \
                or block.attn2 is None or block.pos_embed is not None:
            raise TypeError("model.fast_blocks: the blocks are not PixArt's ada_norm_single blocks with cross-attention")
        block.__class__ = FastPixArtBlock
        block.residual_dtype = residual_dtype
    model.__class__ = FastPixArtTransformer2DModel
    model.residual_dtype = residual_dtype
    return model


def make_plain(model: PixArtTransformer2DModel) -> PixArtTransformer2DModel:
    """Undo `make_fast` (in place)."""
    for block in model.transformer_blocks:
        if type(block) is FastPixArtBlock:
            block.__class__ = BasicTransformerBlock
            block.__dict__.pop("residual_dtype", None)
    if type(model) is FastPixArtTransformer2DModel:
        model.__class__ = PixArtTransformer2DModel
        model.__dict__.pop("residual_dtype", None)
    return model
