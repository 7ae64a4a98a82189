"""Each benchmark script runs at its tiny size on the CPU, in a subprocess, and prints its table.

The numbers of a CPU smoke run mean nothing; what is checked is that the script runs end to end
through the project's code, prints a Markdown table with the expected columns and one row per
case, and writes JSON rows whose throughputs are positive finite numbers. Also: the GPU session
script passes `bash -n` and lists every command in --dry-run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, args: list[str], tmp_path: Path, timeout: int = 240,
               device: str = "cpu") -> tuple[str, list[dict]]:
    out_json = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--device", device, "--json", str(out_json),
                           *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    return proc.stdout, rows


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, f"no Markdown table in:\n{stdout[-2000:]}"
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set("".join(cells[1])) <= {"-"}, "second table line is not the header rule"
    return cells[0], cells[2:]


def positive(rows: list[dict], key: str) -> None:
    values = [r[key] for r in rows]
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values), (key, values)


def test_train_step_tiny(tmp_path):
    stdout, rows = run_script("train_step", ["--sizes", "tiny", "--texts", "t5-tiny", "--steps", "2",
                                                    "--warmup", "1"], tmp_path)
    header, body = table(stdout)
    for col in ("model", "text", "variant", "batch", "img/s", "TFLOP/s", "MFU %", "peak GiB", "levers"):
        assert col in header
    assert len(body) == 3  # 1 model x 1 text shape x 3 variants
    assert {r["variant"] for r in rows} == {"baseline", "plain-levers", "project"}
    positive(rows, "img/s")
    positive(rows, "GFLOP/img")
    by = {(r["text"], r["variant"]): r for r in rows}
    # The FLOP counter saw forward + backward of the same architecture in every row of a text shape.
    for text in {r["text"] for r in rows}:
        flops = {by[(text, v)]["GFLOP/img"] for v in ("baseline", "plain-levers", "project")}
        assert max(flops) / min(flops) < 1.01, flops
    assert "nomask" in by[(rows[0]["text"], "plain-levers")]["levers"]
    assert "compile skipped" in by[(rows[0]["text"], "plain-levers")]["levers"]  # CPU: honest label, no silent change


def test_variant_parsing_and_table_helpers():
    sys.path.insert(0, str(BENCH))
    try:
        import common
        import train_step
    finally:
        sys.path.remove(str(BENCH))
    v = train_step.Variant.parse("plain-levers")
    assert (v.base, v.levers) == ("baseline", {"nomask", "compile"})
    with pytest.raises(SystemExit, match="turbo"):
        train_step.Variant.parse("baseline+turbo")
    case = train_step.Case("DiT-tiny/2", "t5-tiny", 8, 16, caption_tokens=40)
    padded = train_step.inputs(case, common.pick_device("cpu"))
    lengths = padded["mask"].sum(dim=1)
    assert padded["mask"].shape == (16, 120) and lengths.min() >= 30 and lengths.max() <= 40
    assert (padded["mask"][:, :-1] >= padded["mask"][:, 1:]).all()  # right padding: ones, then zeros
    text = common.markdown_table([{"a": 1234.5, "b": None}], ["a", "b"])
    assert text.splitlines()[2] == "| 1,234.5 | - |"
    calls = []
    times = common.time_repeats(lambda: calls.append(1), device=common.pick_device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_caption_throughput_tiny(tmp_path):
    stdout, rows = run_script("caption_throughput", ["--shape", "tiny", "--batch-sizes", "1", "3",
                                                     "--new-tokens", "8", "--repeats", "1"], tmp_path)
    header, body = table(stdout)
    for col in ("path", "batch", "img/s", "new tokens/img", "TFLOP/s", "MFU %", "peak GiB"):
        assert col in header
    assert [(r["path"], r["batch"]) for r in rows] == [("plain generate", 1), ("plain generate", 3),
                                                        ("project run loop", 1), ("project run loop", 3)]
    positive(rows, "img/s")
    assert all(r["new tokens/img"] == 8 for r in rows)  # min_new_tokens forced every caption to full length


def test_data_cpu_tiny(tmp_path):
    stdout, rows = run_script("data_cpu", ["--samples", "24", "--image-size", "128", "--resolution", "64",
                                           "--caption-size", "64", "--texts", "clip-tiny", "--min-seconds", "0.1",
                                           "--max-passes", "1", "--batch", "8"], tmp_path)
    header, body = table(stdout)
    for col in ("stage", "samples/s (1 process)", "MB/sample", "GPU consumer", "processes needed"):
        assert col in header
    stages = {r["stage"] for r in rows}
    assert any(s.startswith("tar read") for s in stages) and any("feature-cache read, clip-tiny" in s for s in stages)
    assert any(s.startswith("trainer decode") for s in stages) and any(s.startswith("captioner decode") for s in stages)
    positive(rows, "samples/s (1 process)")
    cache = next(r for r in rows if "feature-cache" in r["stage"])
    # One cached row: 2 captions x 77 x 64 fp16 embeddings + masks + 4x8x8 fp16 mean and logvar, at least.
    assert cache["MB/sample"] >= (2 * 77 * 64 * 2 + 2 * 4 * 8 * 8 * 2) / 1e6
    # Old and new readers and decodes side by side in the same run (the script checks the readers agree).
    for part in ("get_slice (before)", "memory-mapped", "full decode (before)", "JPEG draft (min_side)"):
        assert any(part in s for s in stages), part


def test_jpeg_draft_decode_keeps_the_short_side_and_skips_work():
    import io

    import numpy as np
    from PIL import Image

    from t2i_recap.images import decode_image, draft_size

    arr = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    assert decode_image(data).image.size == (800, 600)
    assert decode_image(data, min_side=256).image.size == (400, 300)  # 1/2 scale: short side 300 >= 256
    assert decode_image(data, min_side=70).image.size == (100, 75)  # 1/8, the smallest libjpeg scale
    assert decode_image(data, min_side=700).image.size == (800, 600)  # larger than the image: full size
    assert draft_size((800, 600), 256) == (342, 256)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    assert decode_image(png.getvalue(), min_side=70).image.size == (800, 600)  # only JPEG has a draft mode


def test_trainer_e2e_tiny(tmp_path):
    stdout, rows = run_script("trainer_e2e", ["--size", "tiny", "--steps", "2", "--warmup", "1",
                                              "--loaders", "mem", "0",
                                              "--work", str(tmp_path / "work")], tmp_path)
    header, body = table(stdout)
    for col in ("step", "model", "loader", "img/s", "step ms", "data wait ms", "wait %", "real tokens", "TFLOP/s",
                "MFU %"):
        assert col in header
    assert [r["loader"] for r in rows] == ["in memory", "0 workers"]
    assert all(r["step"] == "trainer" for r in rows)
    # Real tokens: the synthetic recaptions fill most of CLIP's 77 positions, never all (padding), never none.
    assert all(2 <= r["real tokens"] < 77 for r in rows)
    positive(rows, "TFLOP/s")
    positive(rows, "img/s")
    assert all(0 <= r["wait %"] <= 100 for r in rows)
    # Repeating one in-memory batch costs next() nothing measurable next to decoding rows from the cache.
    assert rows[0]["data wait ms"] < rows[1]["data wait ms"]
    assert not list((tmp_path / "work" / "runs" / "w0").glob("checkpoints/step-*")), "checkpoint written by default"


def test_gpu_suite_script_dry_run(tmp_path):
    script = BENCH / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in ("train_step.py", "trainer_e2e.py", "caption_throughput.py", "data_cpu.py"):
        assert name in proc.stdout
    assert "timeout" in proc.stdout
    assert not list(out.iterdir()), "a dry run wrote files"
    # Each part's timeout is cut to what is left of --time-limit; with under a minute left, it is skipped.
    short = subprocess.run(["bash", str(script), "--dry-run", "--out", str(out), "--time-limit", "30", "train-b4",
                            "caption"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert short.returncode == 0 and short.stdout.count("skipped") == 2, short.stdout
    bad = subprocess.run(["bash", str(script), "--dry-run", "train-b5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'train-b5'" in bad.stderr


def test_fake_tensor_flop_count_matches_a_real_step():
    """--flops-only counts on fake tensors; it must equal the count of a real forward + backward."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import common
        import train_step
    finally:
        sys.path.remove(str(BENCH))
    case = train_step.Case("DiT-tiny/2", "clip-tiny", 8, 3)
    fake, params = train_step.counted_flops_per_image(case)
    torch.manual_seed(0)
    model = train_step.plain_model(case)
    b = train_step.inputs(case, torch.device("cpu"))

    def fwd_bwd():
        out = model(b["x0"], timestep=torch.ones(3) * 500.0, encoder_hidden_states=b["emb"],
                    encoder_attention_mask=b["mask"], added_cond_kwargs=None, return_dict=False)[0]
        out.float().square().mean().backward()

    real = common.count_flops(fwd_bwd)
    assert real > 0 and abs(real / 3 - fake) / fake < 1e-6, (real / 3, fake)
    assert params == sum(p.numel() for p in model.parameters())


@pytest.mark.gpu
def test_train_step_tiny_on_cuda_compiles_and_reports_memory(tmp_path):
    """On a GPU: bf16 autocast and torch.compile are really applied, and MFU and peak memory are filled in."""
    stdout, rows = run_script("train_step", ["--sizes", "tiny", "--texts", "clip-tiny", "--steps", "3"], tmp_path,
                              timeout=600, device="cuda")
    by = {r["variant"]: r for r in rows}
    assert "bf16-autocast" in by["baseline"]["levers"] and "fused-adamw" in by["baseline"]["levers"]
    assert "compile" in by["plain-levers"]["levers"] and "skipped" not in by["plain-levers"]["levers"]
    for r in rows:
        assert r["peak GiB"] > 0 and r["MFU %"] > 0


def test_tiny_captioner_stops_at_once_unless_forced():
    """The tiny shape suppresses every token but the end token, so the caption benchmark's
    'new tokens/img' column proves that each path really forced full-length captions."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import caption_throughput as ct
    finally:
        sys.path.remove(str(BENCH))
    shape = ct.SHAPES["tiny"]
    processor = ct.build_processor(shape)
    model = ct.build_model(shape, processor, torch.device("cpu"), torch.float32)
    plain = ct.PlainGenerate(model, processor, torch.device("cpu"), torch.float32, new_tokens=5)
    inputs = plain.inputs(ct.web_images(2))
    with torch.inference_mode():
        free = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    eos = processor.tokenizer.eos_token_id
    assert [ct.tokens_before_eos(r, eos) for r in free.tolist()] == [0, 0]
    assert plain.caption(ct.web_images(2)) == [5, 5]


@pytest.mark.slow
def test_captioner_sweep_tiny(tmp_path):
    """The GPU captioner sweep at smoke size on the CPU: worlds made, two variants fine-tuned side
    by side, each scored by `caption fidelity`, the table printed and the best one packed."""
    import tarfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    pack = tmp_path / "best.tar"
    proc = subprocess.run([sys.executable, str(BENCH / "captioner_sweep.py"), "--out", str(tmp_path / "sweep"),
                           "--tiny", "--variants", "l2h128", "l4h128", "--pack", str(pack)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    header, body = table(proc.stdout)
    assert "exact 1-2 obj" in header and [row[0] for row in body] == ["l2h128", "l4h128"]
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    for row in rows:
        assert row["finetune_exit"] == 0 and row["steps"] == 3 and 0.0 <= row["exact_1_2"] <= 1.0
        assert row["n_1_2"] > 0
    with tarfile.open(pack) as tar:
        names = tar.getnames()
    assert any(n.endswith("model.safetensors") for n in names) and any(n.endswith("fidelity.json") for n in names)
