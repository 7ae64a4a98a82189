"""Train the shapes world's tiny `diffusers.AutoencoderKL` on rendered scenes.

With it, shapes-world training is latent diffusion exactly as at real scale (an SD-style VAE,
latents scaled by `config.scaling_factor`). The scaling factor is measured, not guessed: 1 / the
std of posterior-mean latents over held-out scenes, as Stable Diffusion's 0.18215 was measured.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from t2i_recap.logging_utils import get_logger
from t2i_recap.shapes.scene_batches import render_uint8, sample_scenes, uint8_to_tensor

log = get_logger(__name__)


@dataclasses.dataclass
class VaeTrainConfig:
    """Size and training schedule of the tiny VAE."""

    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])
    """Channels per resolution level; each level after the first halves the side: 2 levels give
    16x16x4 latents at 32 px, 3 levels 8x8x4 (which needs far more CPU training to pass the gate)."""
    layers_per_block: int = 1
    """ResNet blocks per encoder level (the decoder uses one more, as in diffusers)."""
    norm_num_groups: int = 8
    """GroupNorm groups; must divide every entry of block_out_channels."""
    latent_channels: int = 4
    """Latent channels (4, as Stable Diffusion's VAE)."""
    mid_block_attention: bool = False
    """Self-attention in the mid block; unnecessary for 8x8 latents of flat shapes, and slow on CPU."""
    steps: int = 1000
    """Optimizer steps (measured with the defaults: oracle agreement 0.75 at 200, 0.89 at 300)."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    kl_weight: float = 1e-5
    """Weight of the KL term against the squared-error reconstruction loss (both summed per image)."""
    init_logvar: float = -6.0
    """Initial posterior log-variance (bias of the quant conv). A fresh VAE samples latents with
    unit noise that swamps the encoder's signal; starting small lets the decoder learn at once."""
    eval_scenes: int = 200
    """Held-out scenes for the oracle agreement gate and the latent std."""

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be positive, got {self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry")
        for name in ("layers_per_block", "latent_channels", "batch_size", "eval_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"steps and warmup_steps must be >= 0, got {self.steps}, {self.warmup_steps}")
        if self.lr <= 0 or self.kl_weight < 0:
            raise ValueError(f"lr must be positive and kl_weight >= 0, got {self.lr}, {self.kl_weight}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def build_vae(cfg: VaeTrainConfig, resolution: int) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL (call torch.manual_seed first for a fixed init)."""
    if resolution % cfg.downsample_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsample factor "
                         f"{cfg.downsample_factor}")
    levels = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=resolution,
        mid_block_add_attention=cfg.mid_block_attention,
    )
    with torch.no_grad():  # quant_conv outputs (mean, logvar) stacked on the channel axis
        vae.quant_conv.bias[cfg.latent_channels:] = cfg.init_logvar
    return vae


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, H, W) in [-1, 1], the range diffusers' VAEs work in."""
    return uint8_to_tensor(images).mul_(2.0).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounding as diffusers' VaeImageProcessor does."""
    x = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8).numpy()


def _lr_factor(step: int, cfg: VaeTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(vae: AutoencoderKL, cfg: VaeTrainConfig, resolution: int, seed: int, held_out=()) -> list[float]:
    """Squared-error reconstruction + a small KL on freshly rendered scenes; returns the loss per step.

    Squared error, not L1: the images are mostly flat background, and L1's median solution paints
    background over small shapes (measured here: oracle agreement 0.00 after 400 L1 steps).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    vae.train()
    losses = []
    for _ in tqdm(range(cfg.steps), desc="vae", leave=False, mininterval=5):
        x = to_model_range(render_uint8(sample_scenes(rng, cfg.batch_size, exclude=held_out), resolution))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = (recon - x).pow(2).flatten(1).sum(1)  # (N,) summed per image, as in SD's VAE loss
        loss = (rec + cfg.kl_weight * posterior.kl()).mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, scenes, resolution: int, batch_size: int = 50) -> dict:
    """Oracle agreement (exact scene match, original vs reconstruction), pixel error, latent std."""
    from t2i_recap.shapes.oracle import read_scene

    vae.eval()
    matches, abs_err, latents = 0, [], []
    for i in range(0, len(scenes), batch_size):
        chunk = list(scenes[i:i + batch_size])
        images = render_uint8(chunk, resolution)
        z = vae.encode(to_model_range(images)).latent_dist.mode()
        recon = to_uint8(vae.decode(z).sample)
        latents.append(z)
        abs_err.append(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean())
        # Agreement compares the oracle's readings of both images, so it measures the VAE alone.
        matches += sum(read_scene(r) == read_scene(o) for r, o in zip(recon, images))
    z = torch.cat(latents)
    return {
        "oracle_agreement": matches / len(scenes),
        "eval_scenes": len(scenes),
        "mean_abs_pixel_error": float(np.mean(abs_err)),
        "latent_std": float(z.std()),
        "latent_mean": float(z.mean()),
        "latent_shape": list(z.shape[1:]),
    }


def build_trained_vae(out_dir: str | Path, cfg: VaeTrainConfig, resolution: int, seed: int) -> dict:
    """Build, train, evaluate and save the VAE (scaling_factor = 1 / latent std) into `out_dir`."""
    start, cpu_start = time.perf_counter(), time.process_time()
    eval_scenes = sample_scenes(random.Random(f"{seed}-vae-eval"), cfg.eval_scenes)
    torch.manual_seed(seed)
    vae = build_vae(cfg, resolution)
    losses = train_vae(vae, cfg, resolution, seed, held_out=eval_scenes)
    record = evaluate_vae(vae, eval_scenes, resolution)
    # Scaled latents have ~unit variance, which the diffusion noise schedule assumes.
    vae.register_to_config(scaling_factor=round(1.0 / max(record["latent_std"], 1e-6), 5))
    vae.save_pretrained(str(out_dir))
    record.update(
        scaling_factor=vae.config.scaling_factor,
        downsample_factor=cfg.downsample_factor,
        final_loss=float(np.mean(losses[-10:])) if losses else None,
        num_parameters=sum(p.numel() for p in vae.parameters()),
        train_seconds=round(time.perf_counter() - start, 2),
        train_cpu_seconds=round(time.process_time() - cpu_start, 2),
    )
    log.info("vae: oracle agreement %.3f over %d held-out scenes, latent std %.3f, %.1fs",
             record["oracle_agreement"], len(eval_scenes), record["latent_std"], record["train_seconds"])
    return record
