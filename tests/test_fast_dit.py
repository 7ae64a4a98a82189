"""The fast PixArt forward (t2i_recap/fast_dit.py) computes what diffusers' PixArtTransformer2DModel
computes, with the same weights and state-dict keys, and the model's speed switches resolve as
documented (model.compile, model.fast_blocks)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from t2i_recap.fast_dit import FastPixArtTransformer2DModel, make_fast, make_plain


def _model(seed: int = 0, learned_sigma: bool = False) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=8 if learned_sigma else 4, num_layers=3, cross_attention_dim=16,
                                     sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=32,
                                     use_additional_conditions=False)
    with torch.no_grad():  # random weights everywhere (diffusers zero-initialises some, which hides mistakes)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    text = torch.randn(3, 7, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    t = torch.tensor([3.0, 500.0, 999.0])
    return x, text, mask, t


def _run(model, x, text, mask, t):
    return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=None,
                 return_dict=False)[0]


@pytest.mark.parametrize("with_mask", [True, False])
def test_forward_and_gradients_match_diffusers(with_mask):
    plain = _model()
    fast = make_fast(copy.deepcopy(plain))
    assert isinstance(fast, FastPixArtTransformer2DModel)
    x, text, mask, t = _inputs()
    mask = mask if with_mask else None
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    texts = [text.clone().requires_grad_(True) for _ in range(2)]
    outs = [_run(m, xi, ti, mask, t) for m, xi, ti in ((plain, xs[0], texts[0]), (fast, xs[1], texts[1]))]
    assert float((outs[0] - outs[1]).detach().abs().max()) < 1e-5
    weight = torch.randn_like(outs[0])
    for out in outs:
        (out * weight).sum().backward()
    grads = dict(plain.named_parameters()), dict(fast.named_parameters())
    for name, p in grads[0].items():
        assert float((p.grad - grads[1][name].grad).abs().max()) < 1e-5 * max(1.0, float(p.grad.abs().max())), name
    assert float((xs[0].grad - xs[1].grad).abs().max()) < 1e-5
    assert float((texts[0].grad - texts[1].grad).abs().max()) < 1e-5


def test_padding_changes_nothing_but_the_masked_tokens():
    """A masked caption token has no influence: changing it leaves the output exactly as it was."""
    fast = make_fast(_model())
    x, text, mask, t = _inputs()
    with torch.no_grad():
        a = _run(fast, x, text, mask, t)
        text2 = text.clone()
        text2[0, 3:] += 100.0
        b = _run(fast, x, text2, mask, t)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1:], b[1:])


def test_keys_shapes_and_export_stay_diffusers(tmp_path):
    plain = _model()
    keys = {k: v.shape for k, v in plain.state_dict().items()}
    fast = make_fast(plain)
    assert {k: v.shape for k, v in fast.state_dict().items()} == keys
    fast.save_pretrained(str(tmp_path / "export"), safe_serialization=True)
    assert json.loads((tmp_path / "export/config.json").read_text())["_class_name"] == "PixArtTransformer2DModel"
    loaded = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "export"))
    assert type(loaded) is PixArtTransformer2DModel
    x, text, mask, t = _inputs()
    with torch.no_grad():
        assert float((_run(loaded, x, text, mask, t) - _run(fast, x, text, mask, t)).abs().max()) < 1e-5
    other = _model(seed=5)
    fast.load_state_dict(other.state_dict())  # a plain state dict loads unchanged
    with torch.no_grad():
        assert float((_run(fast, x, text, mask, t) - _run(other, x, text, mask, t)).abs().max()) < 1e-5
    assert type(make_plain(fast)) is PixArtTransformer2DModel


def test_bf16_residual_stays_close_and_keeps_fp32_weights():
    plain = _model()
    fast = make_fast(copy.deepcopy(plain), residual_dtype=torch.bfloat16)
    x, text, mask, t = _inputs()
    with torch.no_grad():
        ref = _run(plain, x, text, mask, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it (mixed_precision=bf16)
            out = _run(fast, x, text, mask, t)
    out = out.float()  # autocast ends in a bf16 matmul, as the plain model under autocast
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # bf16 rounding of the stream: close, not equal


def test_uncovered_inputs_use_diffusers_forward():
    plain = _model()
    fast = make_fast(copy.deepcopy(plain))
    x, text, mask, t = _inputs()
    bias = ((1 - mask) * -10000.0).unsqueeze(1)  # an already converted bias (3-D): diffusers' path
    with torch.no_grad():
        assert torch.equal(_run(fast, x, text, bias, t), _run(plain, x, text, bias, t))


def test_gradient_checkpointing_matches():
    fast = make_fast(_model())
    x, text, mask, t = _inputs()
    ref = _run(fast, x, text, mask, t)
    fast.enable_gradient_checkpointing()
    out = _run(fast, x, text, mask, t)
    assert float((out - ref).abs().max()) == 0.0
    out.sum().backward()
    assert all(p.grad is not None for p in fast.transformer_blocks.parameters())


def test_refuses_a_model_that_is_not_pixart():
    with pytest.raises(TypeError, match="fast_blocks"):
        make_fast(torch.nn.Linear(2, 2))


# The model config's speed switches.

def test_compile_and_fast_blocks_resolve_off_on_cpu_and_on_on_cuda():
    from t2i_recap.config import ConfigError, from_dict
    from t2i_recap.models import ModelConfig

    auto = ModelConfig()
    assert auto.compile == "auto" and not auto.compile_on("cpu") and auto.compile_on("cuda")
    assert not auto.fast_on("cpu") and auto.fast_on("cuda")
    assert from_dict(ModelConfig, {"compile": True}).compile_on("cpu")
    assert not from_dict(ModelConfig, {"compile": False, "fast_blocks": False}).fast_on("cuda")
    assert from_dict(ModelConfig, {"fast_blocks": True}).fast_on("cpu")
    with pytest.raises(ConfigError, match="compile"):
        from_dict(ModelConfig, {"compile": "sometimes"})
    with pytest.raises(ValueError, match="residual_dtype"):
        ModelConfig(residual_dtype="bfloat16", fast_blocks=False)


def _train(tmp_path, train_assets, train_shards, model: dict, steps: int = 2):
    from fixtures_train import train_config_dict

    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    shards, side = train_shards
    run = tmp_path / "run"
    cfg = train_config_dict(train_assets, shards, run, side, model={"name": "DiT-tiny/2", **model},
                            trainer={"max_steps": steps}, checkpoint={"every_steps": steps},
                            features={"cache_dir": str(tmp_path / "cache")})
    return run, train(from_dict(TrainConfig, cfg))


def test_fast_blocks_train_like_the_plain_model(tmp_path, train_assets, train_shards, one_thread):
    from safetensors.torch import load_file

    runs = {}
    for fast in (False, True):
        run, summary = _train(tmp_path / str(fast), train_assets, train_shards, {"fast_blocks": fast})
        assert summary["speed"]["fast_blocks"] is fast and summary["speed"]["compile"] is False
        runs[fast] = load_file(str(run / "checkpoints/step-00000002/model.safetensors"))
    assert runs[True].keys() == runs[False].keys()
    assert max(float((runs[True][k] - runs[False][k]).abs().max()) for k in runs[True]) < 1e-4


@pytest.mark.slow
def test_compile_true_on_cpu_still_trains(tmp_path, train_assets, train_shards, one_thread):
    """torch.compile per block works on the CPU too (slowly: the inductor builds C++ kernels)."""
    run, summary = _train(tmp_path, train_assets, train_shards, {"compile": True, "fast_blocks": True}, steps=2)
    assert summary["speed"]["compile"] is True and summary["step"] == 2
    assert (run / "checkpoints/step-00000002/model.safetensors").is_file()
