"""The DiT model registry: named sizes x patch sizes, built on diffusers' PixArtTransformer2DModel.

PixArtTransformer2DModel is diffusers' text-conditioned DiT: adaLN-single timestep conditioning
plus cross-attention to projected caption tokens in every block (docs/references.md section 4), which is
the paper's "features injected by cross-attention in every DiT block". Sizes follow DiT
(Peebles & Xie, Table 1): layers / width / heads.
"""

from __future__ import annotations

import dataclasses

from diffusers import PixArtTransformer2DModel

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
    compile: bool = False
    """Wrap the model in torch.compile."""
    learned_sigma: bool = False
    """Predict a variance channel too (out_channels = 2 x latent channels, as DiT/PixArt); the extra
    channels are only split off at sampling time, since both objectives here use a simple MSE loss."""

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {', '.join(MODELS)}")
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.attention!r}")


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
