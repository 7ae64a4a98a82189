"""EMA warm-up: the decay schedule matches diffusers' EMAModel, a short run's EMA moves with the
weights, and the schedule continues across a resume (it reads the trainer's step)."""

from __future__ import annotations

import pytest
import torch

from t2i_recap.ema import EMA, EMAConfig


def test_decay_schedule_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    cfg = EMAConfig(decay=0.9999, warmup=True, inv_gamma=1.0, power=2 / 3)
    ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=2 / 3, min_decay=0.0)
    for step in (1, 2, 3, 10, 100, 10_000, 10_000_000):
        assert cfg.decay_at(step) == pytest.approx(ref.get_decay(step), abs=1e-12), step
    assert cfg.decay_at(10_000_000) == 0.9999
    assert EMAConfig(decay=0.9999, warmup=False).decay_at(1) == 0.9999


def test_short_run_ema_follows_the_weights_with_warmup_only():
    model = torch.nn.Linear(2, 2)
    warm, cold = EMA(model, EMAConfig(decay=0.9999)), EMA(model, 0.9999)
    start = {k: v.clone() for k, v in warm.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for step in range(1, 101):
        warm.update(model, step)
        cold.update(model, step)
    moved_warm = max(float((warm.shadow[k] - start[k]).abs().max()) for k in start)
    moved_cold = max(float((cold.shadow[k] - start[k]).abs().max()) for k in start)
    assert moved_warm > 0.9  # warm-up: the first update copies the weights
    assert moved_cold < 0.02  # constant 0.9999 for 100 steps: barely moved


def test_resume_continues_the_schedule():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    straight = EMA(model, EMAConfig(decay=0.99))
    targets = [torch.randn(3, 3) for _ in range(6)]
    for step, w in enumerate(targets, 1):
        model.weight.data.copy_(w)
        straight.update(model, step)
    # Re-run from scratch in two halves with a state_dict round trip between them.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    a = EMA(model, EMAConfig(decay=0.99))
    for step, w in enumerate(targets[:3], 1):
        model.weight.data.copy_(w)
        a.update(model, step)
    b = EMA(model, EMAConfig(decay=0.99))
    b.load_state_dict(a.state_dict())
    for step, w in enumerate(targets[3:], 4):
        model.weight.data.copy_(w)
        b.update(model, step)
    for k in straight.shadow:
        assert torch.equal(straight.shadow[k], b.shadow[k]), k


def test_bad_warmup_values_name_the_key():
    with pytest.raises(ValueError, match="ema.inv_gamma"):
        EMAConfig(inv_gamma=0.0)
    with pytest.raises(ValueError, match="ema.decay"):
        EMAConfig(decay=1.0)


def _loop_update(shadow: dict, model: torch.nn.Module, decay: float) -> None:
    """The per-parameter update EMA.update replaced (one lerp_ per tensor)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in shadow:
                shadow[name].lerp_(p.detach().float(), 1.0 - decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_update_equals_the_per_tensor_loop(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3)).to(dtype)
    model[1].weight.requires_grad_(False)  # frozen: not in the shadow
    ema = EMA(model, EMAConfig(decay=0.999))
    reference = {k: v.clone() for k, v in ema.shadow.items()}
    assert "1.weight" not in reference
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        _loop_update(reference, model, ema.cfg.decay_at(step))
    assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference)


def test_a_skip_flag_keeps_the_shadow_and_a_zero_flag_updates_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ema = EMA(model, EMAConfig(decay=0.9))
    with torch.no_grad():
        model.weight.add_(1.0)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    ema.update(model, 5, skip=torch.ones(()))
    assert all(torch.equal(ema.shadow[k], before[k]) for k in before)
    reference = {k: v.clone() for k, v in before.items()}
    ema.update(model, 5, skip=torch.zeros(()))
    _loop_update(reference, model, ema.cfg.decay_at(5))
    assert all(torch.allclose(ema.shadow[k], reference[k], rtol=0, atol=1e-7) for k in reference)
    assert not torch.equal(ema.shadow["weight"], before["weight"])
