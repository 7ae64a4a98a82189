"""DiT registry and objectives: sizes, PixArt gotchas, and that each objective's export scheduler
integrates the same ODE/SDE the objective trains (checked through PixArtAlphaPipeline itself)."""

from __future__ import annotations

import pytest
import torch

from t2i_recap.models import MODELS, ModelConfig, build_model, parse_name
from t2i_recap.objectives import ObjectiveConfig, build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names_and_sizes():
    assert {"DiT-B/4", "DiT-L/2", "DiT-XL/2", "DiT-S/8", "DiT-tiny/1"} <= set(MODELS)
    assert parse_name("DiT-XL/2") == ("XL", 2)
    with pytest.raises(ValueError, match="known"):
        ModelConfig(name="DiT-B/3")


def test_build_follows_encoder_and_sets_additional_conditions_off():
    # sample_size 128 would switch use_additional_conditions on by itself (docs/references.md section 4)
    m = build_model(ModelConfig(name="DiT-S/8"), latent_channels=4, latent_size=128, caption_channels=48)
    assert m.config.use_additional_conditions is False and m.use_additional_conditions is False
    assert m.caption_projection.linear_1.in_features == 48
    assert m.config.cross_attention_dim == 384 and m.config.num_layers == 12
    with pytest.raises(ValueError, match="divisible"):
        build_model(ModelConfig(name="DiT-tiny/4"), latent_channels=4, latent_size=6, caption_channels=8)


def _tiny(learned_sigma=False):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="DiT-tiny/2", learned_sigma=learned_sigma), latent_channels=4,
                       latent_size=8, caption_channels=16).eval()


@pytest.mark.parametrize("name", ["rectified_flow", "ddpm"])
def test_loss_is_finite_and_trains(name):
    model = _tiny(learned_sigma=name == "ddpm")
    obj = build_objective(ObjectiveConfig(name=name))
    x0 = torch.randn(4, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(4, 5, 16), "encoder_attention_mask": torch.ones(4, 5)}

    def fn(x, t, **c):
        return model(x, timestep=t, added_cond_kwargs=None, return_dict=False, **c)[0]

    loss = obj.loss(fn, x0, torch.Generator().manual_seed(0), **cond)
    loss.backward()
    assert torch.isfinite(loss) and model.proj_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,tol", [("rectified_flow", 0.02), ("ddpm", 1e-4)])
def test_pipeline_sampler_matches_objective(name, tol, train_assets):
    from diffusers import AutoencoderKL, PixArtAlphaPipeline

    from t2i_recap.text_encoders import TextEncoder, TextEncoderConfig

    text = TextEncoder(TextEncoderConfig(name_or_path=str(train_assets / "clip")))
    model = build_model(ModelConfig(name="DiT-tiny/2"), latent_channels=4, latent_size=8,
                        caption_channels=text.hidden_size).eval()
    obj = build_objective(ObjectiveConfig(name=name))
    pipe = PixArtAlphaPipeline(tokenizer=text.tokenizer, text_encoder=text.model,
                               vae=AutoencoderKL.from_pretrained(str(train_assets / "vae")), transformer=model,
                               scheduler=obj.scheduler())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = pipe(prompt="a red circle", latents=noise.clone(), guidance_scale=1.0, num_inference_steps=25,
               height=16, width=16, output_type="latent", use_resolution_binning=False, clean_caption=False,
               max_sequence_length=77).images
    emb, mask, _ = text.encode(["a red circle"])
    cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask.float()}

    def fn(x, t, **c):
        return model(x, timestep=t, added_cond_kwargs=None, return_dict=False, **c)[0]

    # flow: the solver in the export vs fine Euler steps of the training ODE; ddpm: the same solver
    ref = obj.sample(fn, noise.clone(), num_steps=80 if name == "rectified_flow" else 25, cond=cond)
    rel = float((got - ref).norm() / ref.norm())
    print(name, rel)
    assert rel < tol, rel


def test_trimming_text_padding_leaves_the_output_unchanged():
    from t2i_recap.mixing import trim_padding

    model = _tiny()
    emb = torch.randn(2, 77, 16)
    mask = torch.zeros(2, 77)
    mask[0, :5], mask[1, :9] = 1, 1
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        full = model(x, timestep=t, encoder_hidden_states=emb, encoder_attention_mask=mask, added_cond_kwargs=None).sample
        e, m = trim_padding(emb, mask)
        short = model(x, timestep=t, encoder_hidden_states=e, encoder_attention_mask=m, added_cond_kwargs=None).sample
    assert e.shape[1] == 9 and torch.allclose(full, short, atol=1e-5)
    # Nothing left padded: no mask at all (SDPA's flash path), and still the same output.
    mask[0, :9] = 1
    with torch.no_grad():
        full = model(x, timestep=t, encoder_hidden_states=emb, encoder_attention_mask=mask, added_cond_kwargs=None).sample
        e, m = trim_padding(emb, mask)
        short = model(x, timestep=t, encoder_hidden_states=e, encoder_attention_mask=m, added_cond_kwargs=None).sample
    assert e.shape[1] == 9 and m is None and torch.allclose(full, short, atol=1e-5)
