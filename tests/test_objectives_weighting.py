"""Timestep densities, the SD3 shift and min-SNR weighting come from diffusers.training_utils and
reach the exported scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from t2i_recap.objectives import ObjectiveConfig, build_objective


def _t(n=4096, seed=0, **kw):
    return build_objective(ObjectiveConfig(**kw)).sample_t(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_density_is_diffusers(scheme):
    got = _t(64, seed=3, weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.0)
    want = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=0.8, mode_scale=1.0,
                                                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert ((got > 0) & (got < 1)).all()


def test_densities_differ():
    ln, mode, uni = (_t(weighting_scheme=s) for s in ("logit_normal", "mode", "uniform"))
    # logit-normal and mode (s=1.29) concentrate on the middle; uniform does not
    mid = lambda t: float(((t > 0.25) & (t < 0.75)).float().mean())  # noqa: E731
    assert mid(ln) > 0.6 > mid(uni) - 0.1 and abs(mid(uni) - 0.5) < 0.05
    assert mid(mode) > mid(uni) + 0.1


def test_shift_moves_t_toward_noise_by_sd3_formula():
    base, shifted = _t(seed=1), _t(seed=1, shift=3.0)
    assert torch.allclose(shifted, 3.0 * base / (1 + 2.0 * base), atol=1e-6)
    assert shifted.mean() > base.mean() + 0.1  # more training at high noise
    assert torch.allclose(_t(seed=1, shift=1.0), base)


def test_snr_gamma_weights_are_min_snr():
    obj = build_objective(ObjectiveConfig(name="ddpm", snr_gamma=5.0))
    t = torch.tensor([0, 10, 100, 500, 999])
    snr = compute_snr(obj.train_scheduler, t)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    assert torch.allclose(obj.loss_weights(t), want)
    assert obj.loss_weights(t)[0] < 0.01 and obj.loss_weights(t)[-1] == 1.0  # low noise down-weighted


def test_snr_gamma_changes_the_loss():
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, **c: torch.zeros_like(x)  # noqa: E731  (loss = mean noise^2 x weight)
    plain = build_objective(ObjectiveConfig(name="ddpm")).loss(model, x0, torch.Generator().manual_seed(1))
    weighted = build_objective(ObjectiveConfig(name="ddpm", snr_gamma=5.0)).loss(model, x0, torch.Generator().manual_seed(1))
    assert float(weighted) < float(plain)


@pytest.mark.parametrize("kw, key", [
    ({"weighting_scheme": "cosmap"}, "objective.weighting_scheme"),
    ({"shift": 0.0}, "objective.shift"),
    ({"shift": -2.0}, "objective.shift"),
    ({"name": "ddpm", "shift": 3.0}, "objective.shift"),
    ({"snr_gamma": 5.0}, "objective.snr_gamma"),
    ({"name": "ddpm", "snr_gamma": 0.0}, "objective.snr_gamma"),
    ({"mode_scale": 2.5}, "objective.mode_scale"),
    ({"logit_std": 0.0}, "objective.logit_std"),
])
def test_bad_values_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ObjectiveConfig(**kw)


def test_override_refuses_bad_shift():
    from t2i_recap.config import load_config
    from t2i_recap.train_config import TrainConfig

    assert load_config(TrainConfig, None, ["objective.shift=3.0"]).objective.shift == 3.0
    with pytest.raises(ValueError, match="shift"):
        load_config(TrainConfig, None, ["objective.shift=-1"])


def test_exported_scheduler_carries_the_shift():
    sched = build_objective(ObjectiveConfig(shift=3.0)).scheduler()
    assert sched.config.flow_shift == 3.0
    sched.set_timesteps(10)
    # the sampler's noise levels are the training shift applied to its unshifted grid
    plain = build_objective(ObjectiveConfig()).scheduler()
    plain.set_timesteps(10)
    s0 = plain.sigmas[:-1].double()
    assert torch.allclose(sched.sigmas[:-1].double(), 3.0 * s0 / (1 + 2.0 * s0), atol=1e-5)
    assert not math.isclose(float(sched.sigmas[1]), float(plain.sigmas[1]))
