"""Captioning throughput: the project's captioning loop vs plain transformers `generate`, in img/s.

The model is LLaVA-1.5-shaped (CLIP ViT-L/14 at 336 px, 576 image tokens, 2-layer GELU projector) with a
LLaMA-3-8B-shaped decoder (4096 wide, 32 layers, 8 KV heads, 128,256-token vocabulary), random weights
in bf16, as docs/references.md section 3's measurement (13.6 img/s at batch 64, 17.7 at 128, one H100).
Every caption is forced to exactly --new-tokens tokens (min_new_tokens), so batches cost the same
whatever the random weights emit (the tiny shape's head suppresses every token but the end
token, so a path that fails to force shows it). Both paths start from decoded images and include
CPU preprocessing and token decoding, as a captioning run does; the project's path is
`captioner.run.ShardCaptioner` over `TransformersBackend`, which prepares batch k+1 in a thread
while batch k generates. The tokenizer is the project's small BPE (no hub access); it spends more
tokens on the prompt than LLaMA-3's would, and the table reports the real prompt length.

Per batch size: img/s over a stream of --repeats batches after one warm-up batch (so the project's
overlap of preparing batch k+1 while batch k generates counts, as in a real run), peak GPU memory,
generated tokens per image, and TFLOP/s + MFU from the FLOPs of one image's generation counted
by torch.utils.flop_counter (vision tower, prefill and 128 decode steps with the KV cache).

  python benchmarks/caption_throughput.py --shape 8b --device cuda --batch-sizes 32 64 128
  python benchmarks/caption_throughput.py --shape tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (H100_BF16_DENSE_TFLOPS, add_output_args, count_flops, free_memory, is_oom,  # noqa: E402
                    peak_memory_gib, pick_device, report, reset_peak_memory, synchronize)

PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
SHAPES = {
    # LLaVA-1.5 vision side + LLaMA-3-8B (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads).
    "8b": dict(image=336, patch=14, v_hidden=1024, v_mlp=4096, v_layers=24, v_heads=16,
               hidden=4096, mlp=14336, layers=32, heads=32, kv_heads=8, vocab=128256, rope_theta=500000.0,
               batch_sizes=[32, 64, 128]),
    "tiny": dict(image=32, patch=8, v_hidden=32, v_mlp=64, v_layers=2, v_heads=2,
                 hidden=64, mlp=128, layers=2, heads=4, kv_heads=2, vocab=None, rope_theta=500000.0,
                 batch_sizes=[1, 4], eos_first=True),
}
SPECIALS = ["<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_processor(shape: dict):
    """LlavaProcessor: the project's BPE tokenizer with LLaMA-3 chat specials + CLIP 336 preprocessing."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from t2i_recap.captioner.chat_templates import llama3_template
    from t2i_recap.captioner.tiny import base_tokenizer

    tok = base_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    size = shape["image"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # An empty system prompt keeps the text part near LLaMA-3's ~40 prompt tokens.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=shape["patch"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=llama3_template(system=""))


def build_model(shape: dict, processor, device: torch.device, dtype: torch.dtype):
    """Random LlavaForConditionalGeneration, initialised directly on `device` in `dtype`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=shape["v_hidden"], intermediate_size=shape["v_mlp"],
                              num_hidden_layers=shape["v_layers"], num_attention_heads=shape["v_heads"],
                              image_size=shape["image"], patch_size=shape["patch"], projection_dim=768)
    text = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["mlp"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                       vocab_size=shape["vocab"] or len(tok), max_position_embeddings=8192,
                       rope_theta=shape["rope_theta"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.do_sample = False
    if shape.get("eos_first"):
        # Every token but the end token is suppressed, so the model stops at once unless a path
        # really forces full-length captions: the smoke test then sees any path that fails to.
        gen.suppress_tokens = [i for i in range(model.config.text_config.vocab_size) if i != tok.eos_token_id]
    return model.eval()


def web_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Landscape 640x480 images, resized and cropped by the processor as real web images are."""
    rng = np.random.default_rng(seed)
    small = [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)) for _ in range(min(n, 16))]
    return [small[i % len(small)].resize((640, 480), Image.Resampling.BICUBIC) for i in range(n)]


class PlainGenerate:
    """What a user writes with transformers alone: processor + chat template, left padding, generate."""

    def __init__(self, model, processor, device, dtype, new_tokens: int):
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self.new_tokens = new_tokens
        processor.tokenizer.padding_side = "left"
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token

    def inputs(self, images):
        conv = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}] for _ in images]
        texts = self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        batch = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}

    @torch.inference_mode()
    def caption(self, images) -> list[int]:
        inputs = self.inputs(images)
        out = self.model.generate(**inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                  do_sample=False, num_beams=1)
        new = out[:, inputs["input_ids"].shape[1]:]
        self.processor.batch_decode(new, skip_special_tokens=True)
        return [tokens_before_eos(row, self.processor.tokenizer.eos_token_id) for row in new.tolist()]

    def __call__(self, batches: list[list[Image.Image]]) -> list[int]:
        """One batch after the other, each prepared, generated and decoded in turn."""
        return [n for images in batches for n in self.caption(images)]


def tokens_before_eos(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)


class ProjectBackend:
    """The project's captioning loop: `captioner.run.ShardCaptioner` over `TransformersBackend` (loaded
    from the saved folder like a checkpoint), which prepares batch k+1 in a thread while batch k
    generates. The samples are decoded PIL images held in memory, as the plain path gets them."""

    def __init__(self, folder: Path, device, dtype, new_tokens: int, extra: dict):
        from t2i_recap.captioner.backend import TransformersBackend

        self.backend = TransformersBackend(str(folder), device=device, dtype=dtype, **extra)
        self.new_tokens = new_tokens
        # Benchmark only: force full-length captions. The run loop calls generate() without
        # min_new_tokens, and an explicit None there would override the generation config.
        generate = self.backend.generate
        self.backend.generate = lambda prepared, max_new_tokens=128, min_new_tokens=0: generate(
            prepared, max_new_tokens, new_tokens)

    def __call__(self, batches: list[list[Image.Image]]) -> list[int]:
        from t2i_recap.captioner.readers import Sample, Shard
        from t2i_recap.captioner.run import CaptionRunConfig, ShardCaptioner

        images = [img for batch in batches for img in batch]
        samples = [Sample(key=f"{i:09d}", shard="bench", image=img, org_caption="a photo") for i, img in enumerate(images)]
        shard = Shard(name="bench", source="memory", opener=lambda: iter(samples))
        cfg = CaptionRunConfig(batch_size=len(batches[0]), max_new_tokens=self.new_tokens)
        rows, _ = ShardCaptioner(self.backend, cfg).run(shard)
        failed = [r.error for r in rows if r.status != "ok"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(rows)} captions failed, e.g. {failed[0]}")
        return [r.re_num_tokens for r in rows]


def measure(runner, images_per_batch: int, repeats: int, device) -> dict:
    """img/s over a stream of `repeats` batches (after a one-batch warm-up), so overlap between
    batches counts, as it does in a captioning run."""
    import time

    runner([web_images(images_per_batch)])  # warm-up: kernels, allocator, any compilation
    synchronize(device)
    reset_peak_memory(device)
    batches = [web_images(images_per_batch, seed=r + 1) for r in range(repeats)]
    t0 = time.perf_counter()
    tokens = runner(batches)
    synchronize(device)
    sec = time.perf_counter() - t0
    return {"img/s": images_per_batch * repeats / sec, "s/batch": sec / repeats,
            "new tokens/img": float(np.mean(tokens)), "peak GiB": peak_memory_gib(device)}


def prompt_tokens(plain: PlainGenerate) -> int:
    return int(plain.inputs(web_images(1))["input_ids"].shape[1])


def count_generation_flops(model, plain: PlainGenerate) -> float:
    """FLOPs of one image's caption, counted under eager attention: torch's FLOP counter rejects the
    grouped-query shapes that SDPA gets with `enable_gqa` (seen on an H200, torch 2.11), while eager
    attention repeats the KV heads into plain matmuls that it counts exactly as SDPA's math."""
    model.set_attn_implementation("eager")
    try:
        return count_flops(lambda: plain.caption(web_images(1)))
    finally:
        model.set_attn_implementation("sdpa")


def run_rows(name: str, runner, args, device, flops_per_img: float | None) -> list[dict]:
    rows = []
    for bs in args.batch_sizes:
        row = {"path": name, "batch": bs}
        try:
            row.update(measure(runner, bs, args.repeats, device))
        except Exception as exc:  # noqa: BLE001 - record OOM at large batches, keep the table
            if not is_oom(exc) and not args.keep_going:
                raise
            row["note"] = "out of memory" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            free_memory(device)
            rows.append(row)
            continue
        if flops_per_img:
            row["TFLOP/s"] = flops_per_img * row["img/s"] / 1e12
            row["MFU %"] = 100 * row["TFLOP/s"] / args.peak_tflops
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="8b (needs a GPU) or tiny (CPU smoke test)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 32 64 128 (8b), 1 4 (tiny)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per image, forced (the paper: 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per batch size (after one warm-up batch)")
    p.add_argument("--paths", nargs="+", default=["plain", "project"], choices=["plain", "project"])
    p.add_argument("--backend-kwargs", default="{}", help="JSON of extra TransformersBackend(...) arguments "
                   "(speed switches it exposes, e.g. '{\"attn_implementation\": \"sdpa\"}')")
    p.add_argument("--weights-dir", default=None, help="where the random model is saved for the backend to load "
                   "(default: a temporary folder; the 8b shape needs ~17 GB of disk)")
    p.add_argument("--keep-going", action="store_true", help="record a failing batch size and go on (OOM always does)")
    p.add_argument("--no-flops", action="store_true", help="skip counting one image's FLOPs")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    shape = SHAPES[args.shape]
    if args.shape == "8b" and device.type != "cuda":
        raise SystemExit("--shape 8b needs a CUDA device (16 GB of bf16 weights); use --shape tiny on a CPU")
    args.batch_sizes = args.batch_sizes or shape["batch_sizes"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    extra = json.loads(args.backend_kwargs)
    processor = build_processor(shape)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-llava-") as tmp:
        folder = Path(args.weights_dir or tmp) / f"llava-{args.shape}-random"
        model = build_model(shape, processor, device, dtype)
        plain = PlainGenerate(model, processor, device, dtype, args.new_tokens)
        n_prompt = prompt_tokens(plain)
        flops = None if args.no_flops else count_generation_flops(model, plain)
        params = sum(p.numel() for p in model.parameters())
        if "plain" in args.paths:
            rows += run_rows("plain generate", plain, args, device, flops)
        if "project" in args.paths:
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            del model, plain
            free_memory(device)
            try:
                project = ProjectBackend(folder, device, dtype, args.new_tokens, extra)
            except Exception as exc:  # noqa: BLE001 - keep the plain rows when the backend cannot load
                if not args.keep_going:
                    raise
                note = f"failed to load: {type(exc).__name__}: {exc}"[:200]
                rows.append({"path": "project run loop", "note": note})
            else:
                rows += run_rows("project run loop", project, args, device, flops)
                sig = ", ".join(n for n in inspect.signature(type(project.backend).__init__).parameters if n != "self")
                notes.append(f"TransformersBackend({sig}) called with {json.dumps(extra) if extra else 'defaults'}.")
    notes = [f"LLaVA-{args.shape} random weights: {params / 1e6:,.1f} M parameters, {dtype}; prompt {n_prompt} tokens "
             f"(image tokens included), {args.new_tokens} new tokens forced; img/s over a stream of {args.repeats} "
             "batches after a one-batch warm-up.",
             (f"FLOPs per image (counted at batch 1: vision tower, prefill, {args.new_tokens} decode steps): "
              f"{flops / 1e9:,.3f} GFLOP; MFU against {args.peak_tflops:g} TFLOP/s."
              if flops else "FLOPs not counted."), *notes]
    columns = ["path", "batch", "img/s", "s/batch", "new tokens/img", "TFLOP/s", "MFU %", "peak GiB", "note"]
    report(f"captioning ({args.shape})", rows, columns, args, device,
           digits={"TFLOP/s": 1 if device.type == "cuda" else 4, "s/batch": 2, "peak GiB": 1}, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
