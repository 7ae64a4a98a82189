"""Evaluation fixtures: a tiny random CLIP and a tiny random exported PixArt pipeline.

Both are saved with `save_pretrained` and loaded back by the same `from_pretrained` calls a real
checkpoint uses; the pipeline folder has the export's `t2i_recap.json`, so it is exactly what
`t2i-recap export` writes.
"""

from __future__ import annotations

import json

import pytest

EVAL_RES = 24  # >= the oracle's exact minimum (17), small enough to be quick


def build_tiny_clip(out, tokenizer_dir, max_positions: int = 77, seed: int = 0):
    from fixtures_core import build_tiny_clip as build

    return build(out, tokenizer_dir, resolution=EVAL_RES, max_positions=max_positions, seed=seed)


def write_fid_inception_weights(out, images) -> tuple:
    """FID Inception-v3 weights in the standard layout, random (no hub here), with batch-norm
    statistics calibrated on `images` (PIL) plus noise, so that 94 random layers still tell images
    apart; saved as torch-fidelity's file is (a torch.save'd state dict) and as safetensors."""
    import torch
    from safetensors.torch import save_file

    from t2i_recap.evaluate.inception import FIDInceptionV3
    from t2i_recap.evaluate.metric_clip import to_uint8_tensor

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    calib = torch.stack([to_uint8_tensor(i) for i in images])
    noise = (torch.rand(2, *calib.shape[1:]) * 255).to(torch.uint8)
    with torch.no_grad():
        net.train()(torch.cat([calib, noise]))
    state = net.eval().state_dict()
    torch.save(state, out / "weights-inception-2015-12-05.pth")
    save_file(state, out / "inception.safetensors")
    return out / "weights-inception-2015-12-05.pth", out / "inception.safetensors"


def build_tiny_pipeline(out, tokenizer_dir, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=EVAL_RES)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        sample_size=EVAL_RES // 2, patch_size=2, cross_attention_dim=16, caption_channels=32,
        norm_type="ada_norm_single", use_additional_conditions=False, norm_num_groups=4)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler())
    pipe.save_pretrained(str(out))
    (out / "t2i_recap.json").write_text(json.dumps({
        "resolution": EVAL_RES, "max_sequence_length": 32, "objective": "ddpm_eps",
        "num_inference_steps": 2, "guidance_scale": 2.0, "caption_p": 0.0}))
    return out


@pytest.fixture(scope="session")
def eval_clip_dir(tmp_path_factory, shapes_tokenizer_dir):
    return build_tiny_clip(tmp_path_factory.mktemp("eval_clip"), shapes_tokenizer_dir)


@pytest.fixture(scope="session")
def eval_pipeline_dir(tmp_path_factory, shapes_tokenizer_dir):
    return build_tiny_pipeline(tmp_path_factory.mktemp("eval_pipe"), shapes_tokenizer_dir)
