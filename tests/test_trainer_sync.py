"""The train step never waits for the device between log steps.

Trained from the feature cache (the path the contract is for; encoding on the fly runs the text
encoder, whose own code reads). On a GPU every `.item()`, `float(t)`, `int(t)`, `bool(t)` or `.tolist()` of a device tensor stops
the host until the GPU has run everything queued, so the next step cannot be queued behind the
current one. The CPU has no such wait to observe, so the test counts those reads instead: inside a
step that is not a log, checkpoint or validation step the trainer may only read the loader's own
CPU tensors (`Trainer._host_side`), never a loss, a gradient norm or a non-finite flag.
With the fused AdamW (the CUDA default; forced on here) a NaN step is dropped on the device, and the
results are those of the host-side check: same losses, same weights, an exact resume.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from safetensors.torch import load_file

from fixtures_train import train_config_dict

pytestmark = pytest.mark.usefixtures("one_thread")

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _cfg(train_assets, train_shards, run, *, fused: bool, steps: int = 6, log_every: int = 100, **trainer):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig

    shards, side = train_shards
    d = train_config_dict(train_assets, shards, run, side,
                          trainer={"max_steps": steps, "batch_size": 4, "micro_batch_size": 2, "log_every": log_every,
                                   **trainer},
                          optim={"lr": 1e-3, "fused": fused}, checkpoint={"every_steps": 100, "keep": 2},
                          features={"cache_dir": str(run.parent / "cache")})
    return from_dict(TrainConfig, d)


@contextlib.contextmanager
def counted_reads(monkeypatch, trainer):
    """Count host reads of tensors made while the trainer runs `train_step`, outside `_host_side`."""
    state = {"in_step": False, "host_side": False, "reads": []}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, _name=name, **kw):
            if state["in_step"] and not state["host_side"]:
                state["reads"].append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, read)
    real_step, real_host = trainer.train_step, trainer._host_side

    def step(batches):
        state["in_step"] = True
        try:
            return real_step(batches)
        finally:
            state["in_step"] = False

    def host_side(*a, **kw):
        state["host_side"] = True
        try:
            return real_host(*a, **kw)
        finally:
            state["host_side"] = False

    trainer.train_step, trainer._host_side = step, host_side
    yield state
    monkeypatch.undo()


def _train(cfg, monkeypatch=None, resume=None):
    from t2i_recap.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    losses: list[float] = []
    real_log = trainer.log
    trainer.log = lambda m: (losses.append(m["loss"]), real_log(m))
    if monkeypatch is None:
        return trainer, trainer.fit(), losses, None
    with counted_reads(monkeypatch, trainer) as state:
        summary = trainer.fit()
    return trainer, summary, losses, state


def test_no_host_reads_in_the_step(tmp_path, train_assets, train_shards, monkeypatch):
    cfg = _cfg(train_assets, train_shards, tmp_path / "run", fused=True)
    trainer, summary, _, state = _train(cfg, monkeypatch)
    assert trainer.device_skip and summary["step"] == 6
    assert state["reads"] == [], state["reads"]  # 6 steps, only the last settles (outside train_step)


def test_the_host_side_check_does_read(tmp_path, train_assets, train_shards, monkeypatch):
    """The counter sees a read when there is one: without a fused AdamW the check reads the flag."""
    cfg = _cfg(train_assets, train_shards, tmp_path / "run", fused=False, steps=2)
    trainer, _, _, state = _train(cfg, monkeypatch)
    assert not trainer.device_skip and state["reads"].count("__float__") == 2


def test_device_and_host_checks_train_the_same(tmp_path, train_assets, train_shards):
    """Same losses and weights with the device-side flag as with the host-side check (the fused and
    the for-each AdamW agree to float rounding), and the log step still reads every loss."""
    runs = {}
    for fused in (True, False):
        run = tmp_path / f"run-{fused}"
        _, summary, losses, _ = _train(_cfg(train_assets, train_shards, run, fused=fused, log_every=1))
        runs[fused] = (losses, load_file(str(run / "checkpoints/step-00000006/model.safetensors")))
        assert summary["samples"] == 24 and math.isfinite(summary["last"]["grad_norm"])
    (la, wa), (lb, wb) = runs[True], runs[False]
    assert len(la) == 6 and la == pytest.approx(lb, abs=1e-5)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_exact_resume_with_the_device_flag(tmp_path, train_assets, train_shards):
    straight = tmp_path / "straight"
    _train(_cfg(train_assets, train_shards, straight, fused=True, steps=4))
    run = tmp_path / "run"
    _train(_cfg(train_assets, train_shards, run, fused=True, steps=2))
    _train(_cfg(train_assets, train_shards, run, fused=True, steps=4), resume="latest")
    for name in ("model", "ema", "optimizer"):
        a = load_file(str(straight / f"checkpoints/step-00000004/{name}.safetensors"))
        b = load_file(str(run / f"checkpoints/step-00000004/{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture
def poison(monkeypatch):
    from t2i_recap.trainer import Trainer

    real = Trainer._micro_step

    def arm(step: int) -> None:
        def micro_step(self, batch, micro):
            loss, counts, trunc = real(self, batch, micro)
            return (loss * math.nan if self.step == step else loss), counts, trunc

        monkeypatch.setattr(Trainer, "_micro_step", micro_step)

    return arm


def test_skip_on_the_device_leaves_every_state_unchanged(tmp_path, train_assets, train_shards, poison):
    run = tmp_path / "run"
    cfg = _cfg(train_assets, train_shards, run, fused=True, on_nonfinite_loss="skip")
    cfg.checkpoint.every_steps = 1
    cfg.checkpoint.keep = 10
    poison(3)
    _, summary, _, _ = _train(cfg)
    assert summary["nonfinite_skipped"] == 1 and summary["step"] == 6
    for name in ("model", "ema", "optimizer"):  # step 4 was dropped on the device: no state moved
        a = load_file(str(run / f"checkpoints/step-00000003/{name}.safetensors"))
        b = load_file(str(run / f"checkpoints/step-00000004/{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = load_file(str(run / "checkpoints/step-00000005/model.safetensors"))
    b = load_file(str(run / "checkpoints/step-00000004/model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # and the next step updated again


def test_stop_on_the_device_raises_at_the_next_checkpoint_with_the_weights_before(tmp_path, train_assets,
                                                                                  train_shards, poison):
    from t2i_recap.trainer import NonFiniteLossError

    run = tmp_path / "run"
    cfg = _cfg(train_assets, train_shards, run, fused=True, steps=8)
    cfg.checkpoint.every_steps = 4
    poison(1)  # the 2nd step; the run goes on queueing steps 3-4 with every update dropped
    with pytest.raises(NonFiniteLossError, match=r"step 2: the training loss is not finite \(\[nan, nan\]"):
        _train(cfg)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
