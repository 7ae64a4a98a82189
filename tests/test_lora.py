"""LoRA on an exported pipeline: only adapters train, the base stays bit-exact, and the saved adapter
loads back onto the export's transformer (in place and through peft) and changes its output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_train import train_config_dict, write_config
from t2i_recap.cache import model_identity
from t2i_recap.config import from_dict
from t2i_recap.train_config import TrainConfig
from t2i_recap.trainer import train


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, train_assets, train_shards):
    from t2i_recap.export import export

    root = tmp_path_factory.mktemp("lora_export")
    shards, side = train_shards
    cfg = from_dict(TrainConfig, train_config_dict(train_assets, shards, root / "run", side, trainer={"max_steps": 2},
                                                   objective={"shift": 2.0}, validation={"every_steps": -1}))
    train(cfg)
    return export(root / "run", root / "export")


@pytest.fixture(scope="module")
def lora_dir(export_dir, train_shards, tmp_path_factory):
    from t2i_recap.lora import main

    shards, side = train_shards
    root = tmp_path_factory.mktemp("lora_run")
    data = train_config_dict(export_dir, shards, root, side)["data"]
    config = write_config(root / "lora.yaml", {"data": data, "lora": {"rank": 4, "alpha": 8}, "lr": 1e-2,
                                               "max_steps": 3, "batch_size": 4})
    assert main(["--pipeline", str(export_dir), "--config", str(config), "--out", str(root / "lora")]) == 0
    return root / "lora"


def _pipe(export_dir):
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline.from_pretrained(str(export_dir))


def _forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    emb = torch.randn(2, 5, c.caption_channels, generator=g)
    with torch.no_grad():
        return transformer(x, encoder_hidden_states=emb, timestep=torch.tensor([500.0, 100.0]),
                           added_cond_kwargs=None, return_dict=False)[0]


def test_only_adapters_train(export_dir):
    from t2i_recap.lora import LoraConfig, add_lora

    transformer = _pipe(export_dir).transformer
    base = _forward(transformer)
    model = add_lora(transformer, LoraConfig(rank=2))
    assert torch.equal(_forward(model), base)  # a fresh adapter (B = 0) is the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".attn2.to_k." in n for n in trainable) and any(".attn1.to_out.0." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _forward_grad(model).square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)  # base bit-exact
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


def _forward_grad(transformer):
    g = torch.Generator().manual_seed(1)
    c = transformer.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    emb = torch.randn(2, 5, c.caption_channels, generator=g)
    return transformer(x, encoder_hidden_states=emb, timestep=torch.tensor([500.0, 100.0]), added_cond_kwargs=None,
                       return_dict=False)[0]


def test_saved_adapter_base_unchanged_and_loads(export_dir, lora_dir):
    import peft

    from t2i_recap.lora import load_lora

    assert (lora_dir / "adapter_config.json").is_file()
    weights = load_file(str(lora_dir / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # the adapters learned
    summary = json.loads((lora_dir / "t2i_recap.json").read_text())
    assert summary["steps"] == 3
    # the adapter names its base by content, and training left the export's files as they were
    assert summary["base_transformer"] == model_identity(str(export_dir), "transformer")
    base = _forward(_pipe(export_dir).transformer)

    pipe = _pipe(export_dir)
    load_lora(pipe, lora_dir)
    with_lora = _forward(pipe.transformer)
    assert not torch.allclose(with_lora, base, atol=1e-6)

    via_peft = peft.PeftModel.from_pretrained(_pipe(export_dir).transformer, str(lora_dir))
    assert torch.allclose(_forward(via_peft), with_lora, atol=1e-5)


def test_pipeline_generates_with_adapter(export_dir, lora_dir):
    from t2i_recap.generation import generate_images
    from t2i_recap.lora import load_lora

    s = json.loads((export_dir / "t2i_recap.json").read_text())
    kw = dict(num_inference_steps=2, guidance_scale=s["guidance_scale"], resolution=s["resolution"],
              max_sequence_length=s["max_sequence_length"])
    pipe = _pipe(export_dir)
    assert pipe.scheduler.config.flow_shift == 2.0  # the export carries the training shift
    plain = generate_images(pipe, ["a red circle"], [0], **kw)[0]
    load_lora(pipe, lora_dir)
    adapted = generate_images(pipe, ["a red circle"], [0], **kw)[0]
    assert plain.size == adapted.size and plain.tobytes() != adapted.tobytes()


def test_bad_lora_values_name_the_key():
    from t2i_recap.lora import LoraConfig

    for kw, key in (({"rank": 0}, "lora.rank"), ({"alpha": 0}, "lora.alpha"), ({"target_modules": []}, "lora.target")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            LoraConfig(**kw)


def test_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    from t2i_recap.lora import main

    assert main(["--pipeline", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a t2i-recap export" in capsys.readouterr().err
