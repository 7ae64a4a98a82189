"""Exports run in plain diffusers: `DiffusionPipeline.from_pretrained(DIR)` then `pipe(prompt)` with
diffusers' defaults, in a fresh process that never imports t2i_recap, for CLIP- and T5-conditioned
models at 32 px (2x VAE, 16x16 latent) and 256 px (8x VAE, 32x32 latent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fixtures_train import train_config_dict, write_shards
from t2i_recap.config import from_dict
from t2i_recap.export import export, extend_clip_positions, pipeline_default, plain_call
from t2i_recap.train_config import TrainConfig
from t2i_recap.trainer import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle in the top left corner"


def _tiny_t5(out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5EncoderModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _tiny_vae8(out: Path) -> Path:
    """AutoencoderKL with 8x downsampling (4 blocks), PixArt's VAE shape at toy width."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=256, scaling_factor=0.5).save_pretrained(str(out))
    return out


# (name, text encoder, resolution, VAE, text encoder settings): the 32 px CLIP one keeps its encoder and
# VAE in bf16 during training, the case that exported a bf16 encoder beside a float32 transformer.
CASES = [
    ("clip32", "clip", 32, "vae2", {"dtype": "bfloat16"}, {"vae_dtype": "bfloat16"}),
    ("t5_32", "t5", 32, "vae2", {"max_length": 64}, {}),
    ("clip256", "clip", 256, "vae8", {}, {}),
    ("t5_256", "t5", 256, "vae8", {}, {}),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, train_assets, shapes_tokenizer_dir):
    """{case name: export folder}, each from a 1-step training run."""
    root = tmp_path_factory.mktemp("exports")
    parts = {"clip": train_assets / "clip", "vae2": train_assets / "vae",
             "t5": _tiny_t5(root / "t5", shapes_tokenizer_dir), "vae8": _tiny_vae8(root / "vae8")}
    shards = {res: write_shards(root / f"shards{res}", num=4, shard_size=4, resolution=res) for res in (32, 256)}
    out = {}
    for name, text, res, vae, text_kw, feat_kw in CASES:
        run = root / f"run-{name}"
        cfg = train_config_dict(train_assets, shards[res], run, data={"resolution": res},
                                text_encoder={"name_or_path": str(parts[text]), **text_kw},
                                features={"vae": str(parts[vae]), **feat_kw},
                                trainer={"max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
                                checkpoint={"every_steps": 1}, validation={"every_steps": -1})
        train(from_dict(TrainConfig, cfg))
        out[name] = export(run, root / f"export-{name}")
    return out


PLAIN = textwrap.dedent("""
    import json, sys
    import torch
    from diffusers import DiffusionPipeline
    prompt, long_prompt, out = sys.argv[1], sys.argv[2], {}
    for path in sys.argv[3:]:
        s = json.load(open(path + "/t2i_recap.json"))
        pipe = DiffusionPipeline.from_pretrained(path)
        r = {"cls": type(pipe).__name__, "call": s["diffusers_call"],
             "dtypes": sorted({str(p.dtype) for m in (pipe.transformer, pipe.text_encoder, pipe.vae)
                               for p in m.parameters()})}
        torch.manual_seed(0)
        if s["diffusers_call"] == "pipe(prompt)":
            image = pipe(prompt).images[0]
        else:
            image = pipe(prompt, use_resolution_binning=False).images[0]
            try:
                pipe(prompt)
                r["binning"] = "ran"
            except ValueError as exc:
                r["binning"] = str(exc)
        torch.manual_seed(0)
        ref = pipe(prompt, height=s["resolution"], width=s["resolution"], max_sequence_length=s["max_sequence_length"],
                   use_resolution_binning=False, clean_caption=False).images[0]
        a, b = torch.tensor(list(image.getdata())), torch.tensor(list(ref.getdata()))
        r.update(size=list(image.size), diff=int((a - b).abs().max()), std=float(a.float().std()))
        if s.get("text_encoder_positions"):
            long = pipe(long_prompt, use_resolution_binning=s["diffusers_call"] == "pipe(prompt)").images[0]
            r["long_size"] = list(long.size)
        out[path] = r
    assert "t2i_recap" not in sys.modules and not any(m.startswith("t2i_recap.") for m in sys.modules)
    print(json.dumps(out))
""")


def test_plain_diffusers_call_generates_the_trained_size(exports, tmp_path):
    paths = [str(exports[name]) for name, *_ in CASES]
    long_prompt = " ".join(["a red circle left of a blue square"] * 20)  # > 120 tokens
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", PLAIN, PROMPT, long_prompt, *paths], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)  # cwd outside the repo: t2i_recap is not importable
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for (name, text, size, *_), path in zip(CASES, paths):
        r = got[path]
        assert r["cls"] == "PixArtAlphaPipeline" and r["dtypes"] == ["torch.float32"], (name, r)
        assert r["size"] == [size, size], (name, r)
        # the plain call is the training-settings call: same pixels (no binning resize, padding masked)
        assert r["diff"] <= 1 and r["std"] > 0, (name, r)
        if size == 256:
            assert r["call"] == "pipe(prompt)", (name, r)
        else:  # the reason the card gives is what diffusers does
            assert r["call"] == "pipe(prompt, use_resolution_binning=False)" and r["binning"] == "Invalid sample size"
        if text == "clip":
            assert r["long_size"] == [size, size]  # prompts past 77 tokens run (and are documented as untrained)


def test_export_records_and_documents_the_call(exports):
    for name, text, size, *_ in CASES:
        folder = exports[name]
        s = json.loads((folder / "t2i_recap.json").read_text())
        assert s["resolution"] == size and s["dtype"] == "float32"
        assert s["max_sequence_length"] == {"clip32": 77, "t5_32": 64, "clip256": 77, "t5_256": 120}[name]
        card = (folder / "README.md").read_text()
        assert "pipe = DiffusionPipeline.from_pretrained('THIS_FOLDER')" in card
        assert f"image = {s['diffusers_call'].replace('prompt', repr(PROMPT), 1)}.images[0]  # {size}x{size}" in card
        assert "trust_remote_code" in card and "import t2i_recap" not in card.split("## Captions")[0]
        if s["diffusers_call_reason"]:
            assert "Invalid sample size" in card
        te = json.loads((folder / "text_encoder/config.json").read_text())
        if text == "clip":
            assert te["max_position_embeddings"] == pipeline_default("max_sequence_length") == s["text_encoder_positions"]
            assert "untrained position rows" in card
        assert (folder / ".t2i-recap-output.json").is_file()


def test_plain_call_rules():
    assert plain_call(32, 8) == ("pipe(prompt)", None)  # 256 px, PixArt's VAE
    assert plain_call(64, 8) == ("pipe(prompt)", None)
    call, reason = plain_call(16, 2)  # the shapes world: 32 px under a 2x VAE
    assert call == "pipe(prompt, use_resolution_binning=False)" and "Invalid sample size" in reason
    call, reason = plain_call(32, 2)  # 64 px under a 2x VAE: binning would run at 256 px
    assert call.endswith("use_resolution_binning=False)") and "256x256" in reason


def test_extended_clip_keeps_outputs_for_prompts_that_fit(shapes_tokenizer_dir):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(shapes_tokenizer_dir))
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)).eval()
    rows = model.embeddings.position_embedding.weight.detach().clone()

    def encode(m, length):
        t = tok([PROMPT, "two green triangles"], padding="max_length", max_length=length, truncation=True,
                return_tensors="pt")
        with torch.no_grad():
            return m(t.input_ids, attention_mask=t.attention_mask)[0], t.attention_mask

    before, mask = encode(model, 77)
    extend_clip_positions(model, 120)
    after, _ = encode(model, 120)
    table = model.embeddings.position_embedding.weight
    assert table.shape[0] == 120 and torch.equal(table[:77], rows) and torch.equal(table[100], rows[76])
    valid = mask.bool()
    torch.testing.assert_close(after[:, :77][valid], before[valid], rtol=0, atol=1e-5)
