"""The DiT model registry: named sizes x patch sizes, built on diffusers' PixArtTransformer2DModel.

PixArtTransformer2DModel is diffusers' text-conditioned DiT: adaLN-single timestep conditioning
plus cross-attention to projected caption tokens in every block (docs/references.md section 4), which is
the paper's "features injected by cross-attention in every DiT block". Sizes follow DiT
(Peebles & Xie, Table 1): layers / width / heads.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from diffusers import PixArtTransformer2DModel

from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)

# name -> (layers, heads, head_dim); width = heads * head_dim.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 6, 64),     # 384 wide
    "B": (12, 12, 64),    # 768
    "L": (24, 16, 64),    # 1024
    "XL": (28, 16, 72),   # 1152
    "tiny": (4, 4, 32),   # 128: the shapes world and tests
}
PATCHES: dict[str, tuple[int, ...]] = {"S": (2, 4, 8), "B": (2, 4, 8), "L": (2, 4, 8), "XL": (2, 4, 8), "tiny": (1, 2, 4)}
MODELS: tuple[str, ...] = tuple(f"DiT-{s}/{p}" for s, ps in PATCHES.items() for p in ps)


@dataclasses.dataclass
class ModelConfig:
    name: str = "DiT-B/4"
    """Registry name, e.g. DiT-B/4, DiT-L/2, DiT-XL/2, DiT-tiny/1 (see t2i_recap.models.MODELS)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% slower)."""
    attention: str = "sdpa"
    """Attention kernel: "sdpa" (PyTorch scaled_dot_product_attention, the default) or "xformers"."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block (fullgraph=True; the state-dict keys stay the same): auto = on
    a CUDA device, off on the CPU (where compiling costs more than it saves at these sizes)."""
    fast_blocks: bool | Literal["auto"] = "auto"
    """The fast forward of t2i_recap/fast_dit.py (fused QKV, all blocks' cross-attention K/V in one matmul,
    SDPA with a boolean padding mask; same weights and keys, same export): auto = on a CUDA device
    (not under FSDP, which shards each block's weights), off on the CPU."""
    residual_dtype: Literal["float32", "bfloat16"] = "float32"
    """The activations between blocks (the residual stream) under fast_blocks: bfloat16 halves their
    memory and traffic; weights, optimizer state and EMA stay fp32 either way."""
    learned_sigma: bool = False
    """Predict a variance channel too (out_channels = 2 x latent channels, as DiT/PixArt); the extra
    channels are only split off at sampling time, since both objectives here use a simple MSE loss."""

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {', '.join(MODELS)}")
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.attention!r}")
        if self.compile not in ("auto", True, False):
            raise ValueError(f"model.compile must be auto, true or false, got {self.compile!r}")
        if self.fast_blocks not in ("auto", True, False):
            raise ValueError(f"model.fast_blocks must be auto, true or false, got {self.fast_blocks!r}")
        if self.residual_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.residual_dtype must be float32 or bfloat16, got {self.residual_dtype!r}")
        if self.residual_dtype != "float32" and self.fast_blocks is False:
            raise ValueError("model.residual_dtype=bfloat16 needs model.fast_blocks (auto or true)")

    def compile_on(self, device: torch.device | str) -> bool:
        """The resolved model.compile for a model on `device`."""
        return self.compile is True or (self.compile == "auto" and torch.device(device).type == "cuda")

    def fast_on(self, device: torch.device | str) -> bool:
        """The resolved model.fast_blocks for a model on `device`."""
        return self.fast_blocks is True or (self.fast_blocks == "auto" and torch.device(device).type == "cuda")


def parse_name(name: str) -> tuple[str, int]:
    """"DiT-B/4" -> ("B", 4)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    size, patch = name[len("DiT-"):].split("/")
    return size, int(patch)


def build_model(cfg: ModelConfig, *, latent_channels: int, latent_size: int, caption_channels: int) -> PixArtTransformer2DModel:
    """A freshly initialised DiT for latents of (latent_channels, latent_size, latent_size) and text
    features of width `caption_channels` (the text encoder's hidden size)."""
    size, patch = parse_name(cfg.name)
    layers, heads, head_dim = SIZES[size]
    if latent_size % patch:
        raise ValueError(f"{cfg.name}: latent size {latent_size} is not divisible by the patch size {patch}")
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels * (2 if cfg.learned_sigma else 1),
        num_layers=layers,
        cross_attention_dim=heads * head_dim,  # must equal heads * head_dim (docs/references.md section 4)
        sample_size=latent_size,
        patch_size=patch,
        caption_channels=caption_channels,
        norm_num_groups=32,
        # Set explicitly: left as None it switches on by itself when sample_size == 128 (PixArt gotcha).
        use_additional_conditions=False,
    )
    return model


def configure_model(model: PixArtTransformer2DModel, cfg: ModelConfig) -> None:
    """Apply the runtime switches (checkpointing, attention kernel) that are not part of the weights."""
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("model.attention=xformers but xformers is not installed: pip install t2i-recap[xformers]") from exc
        model.enable_xformers_memory_efficient_attention()


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every transformer block in place (nn.Module.compile: no wrapper, so state-dict
    keys, FSDP wrapping and the export are untouched); one block's graph is reused by all blocks of
    the same shapes. fullgraph=True: a graph break inside a block is an error, not a silent slowdown.
    Returns the number of blocks compiled."""
    blocks = list(getattr(model, "transformer_blocks", []))
    if not blocks:
        raise ValueError(f"model.compile: {type(model).__name__} has no transformer_blocks to compile")
    for block in blocks:
        block.compile(fullgraph=True)
    log.info("torch.compile: %d transformer blocks (fullgraph)", len(blocks))
    return len(blocks)
