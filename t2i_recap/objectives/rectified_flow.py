"""Rectified flow with logit-normal (or mode, or uniform) timesteps (Esser et al. 2024, SD3; minRF's loss()/sample()).

x_t = (1 - t) x_0 + t noise, the model predicts the velocity v = noise - x_0, and the network sees
t on the 0-1000 scale PixArt's timestep embedding expects. Exported with diffusers'
DPMSolverMultistepScheduler in flow mode (as Sana ships), because PixArtAlphaPipeline needs a
scheduler with `init_noise_sigma` and `scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks.
The timestep shift (SD3 section 5.3.2) is the same map as that scheduler's `flow_shift`, so training
and generation see the same noise levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift, t' = shift*t / (1 + (shift-1)*t), as diffusers' flow schedulers apply it."""
    return shift * t / (1 + (shift - 1) * t)


class RectifiedFlow:
    name = "rectified_flow"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps in (0, 1) from the configured density (logit-normal by default: more weight on the
        middle, where learning is hardest), then shifted."""
        c = self.cfg
        u = compute_density_for_timestep_sampling(c.weighting_scheme, n, logit_mean=c.logit_mean, logit_std=c.logit_std,
                                                  mode_scale=c.mode_scale, device=generator.device, generator=generator)
        return shift_t(u, c.shift) if c.shift != 1.0 else u

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator, **cond) -> torch.Tensor:
        """Mean-squared velocity error; `model_fn(x_t, timestep, **cond)` returns the prediction."""
        n = x0.shape[0]
        t = self.sample_t(n, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device=x0.device, dtype=x0.dtype)
        return self.loss_at(model_fn, x0, t, noise, **cond)

    def loss_at(self, model_fn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, **cond) -> torch.Tensor:
        """The loss at given timesteps t in (0, 1) and noise (validation loss: fixed ones)."""
        tb = t.view(x0.shape[0], *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - tb) * x0 + tb * noise
        pred = model_fn(x_t, t * 1000.0, **cond)[:, : x0.shape[1]]
        return F.mse_loss(pred.float(), (noise - x0).float())

    def fixed_timesteps(self, k: int) -> torch.Tensor:
        """k evenly spaced timesteps, the midpoints of [0, 1] cut in k, unshifted: the same noise levels
        for every run, whatever its training density or shift."""
        return (torch.arange(k, dtype=torch.float32) + 0.5) / k

    def scheduler(self) -> DPMSolverMultistepScheduler:
        """The inference scheduler written into exported pipelines."""
        return DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=self.cfg.shift,
            solver_order=2,
            final_sigmas_type="zero",
        )

    @torch.no_grad()
    def sample(self, model_fn, noise: torch.Tensor, num_steps: int = 20, guidance_scale: float = 1.0,
               cond: dict | None = None, uncond: dict | None = None) -> torch.Tensor:
        """Plain Euler integration from t=1 (noise) to t=0, with classifier-free guidance when
        `uncond` is given; a scheduler-free reference for tests and quick looks."""
        x = noise
        ts = shift_t(torch.linspace(1.0, 0.0, num_steps + 1), self.cfg.shift)
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.full((x.shape[0],), float(t) * 1000.0, device=x.device)
            v = model_fn(x, tt, **(cond or {}))[:, : x.shape[1]]
            if uncond is not None and guidance_scale != 1.0:
                v_u = model_fn(x, tt, **uncond)[:, : x.shape[1]]
                v = v_u + guidance_scale * (v - v_u)
            x = x + (t_next - t) * v
        return x
