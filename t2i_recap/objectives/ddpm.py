"""DDPM epsilon prediction (Ho et al. 2020), the objective of the paper's DiT (linear betas, 1000 steps).

Training noise and timesteps come from diffusers' DDPMScheduler so the schedule is exactly the one
the exported DPM-Solver++ scheduler integrates (same betas), which PixArt ships by default.
With `snr_gamma`, each sample's loss is weighted by min(SNR, gamma) / SNR (Min-SNR, Hang et al. 2023,
as diffusers' train_text_to_image.py does for epsilon prediction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr


class DDPMEpsilon:
    name = "ddpm"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.train_scheduler = DDPMScheduler(**self._betas())

    def _betas(self) -> dict:
        return dict(num_train_timesteps=self.cfg.num_train_timesteps, beta_start=self.cfg.beta_start,
                    beta_end=self.cfg.beta_end, beta_schedule="linear", prediction_type="epsilon")

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator, **cond) -> torch.Tensor:
        n = x0.shape[0]
        t = torch.randint(0, self.cfg.num_train_timesteps, (n,), generator=generator, device=generator.device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device=x0.device, dtype=x0.dtype)
        return self.loss_at(model_fn, x0, t, noise, weighted=True, **cond)

    def loss_at(self, model_fn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, weighted: bool = False,
                **cond) -> torch.Tensor:
        """The loss at given integer timesteps and noise; min-SNR weighted only when `weighted` (training),
        so validation losses compare across runs with and without it."""
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        pred = model_fn(x_t, t, **cond)[:, : x0.shape[1]]
        if self.cfg.snr_gamma is None or not weighted:
            return F.mse_loss(pred.float(), noise.float())
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=list(range(1, x0.ndim)))
        return (per_sample * self.loss_weights(t)).mean()

    def fixed_timesteps(self, k: int) -> torch.Tensor:
        """k evenly spaced integer timesteps, the midpoints of [0, T) cut in k."""
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * self.cfg.num_train_timesteps / k).long()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights min(SNR(t), gamma) / SNR(t) for epsilon prediction."""
        snr = compute_snr(self.train_scheduler, t)
        return torch.clamp(snr, max=self.cfg.snr_gamma) / snr

    def scheduler(self) -> DPMSolverMultistepScheduler:
        """The inference scheduler written into exported pipelines (PixArt's default solver)."""
        return DPMSolverMultistepScheduler(**self._betas(), solver_order=2)

    @torch.no_grad()
    def sample(self, model_fn, noise: torch.Tensor, num_steps: int = 20, guidance_scale: float = 1.0,
               cond: dict | None = None, uncond: dict | None = None) -> torch.Tensor:
        """Integrate with the export scheduler, with classifier-free guidance when `uncond` is given."""
        sched = self.scheduler()
        sched.set_timesteps(num_steps, device=noise.device)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            tt = t.expand(x.shape[0])
            eps = model_fn(x, tt, **(cond or {}))[:, : x.shape[1]]
            if uncond is not None and guidance_scale != 1.0:
                eps_u = model_fn(x, tt, **uncond)[:, : x.shape[1]]
                eps = eps_u + guidance_scale * (eps - eps_u)
            x = sched.step(eps, t, x).prev_sample
        return x
