"""Captioning throughput on CPU: batched vs one-at-a-time greedy generation, in images/s.

Runs the project's own path (`TransformersBackend.caption`: processor + chat template, left
padding, greedy `generate`) on shapes-world images. The default model is a tiny random
LLaVA-1.5-shaped captioner built into a temp folder (`t2i_recap.captioner.tiny`); pass --model for
the trained tiny captioner (`t2i-recap caption finetune` output) or any local checkpoint. Each
batched row also checks that its captions equal the one-at-a-time ones (left padding correct).

  python benchmarks/caption_cpu.py                                   # tiny random LLaVA
  python benchmarks/caption_cpu.py --model runs/shapes/captioner     # the trained tiny captioner
  python benchmarks/caption_cpu.py --family idefics3 --images 16 --batch-sizes 4,16
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_args, default_threads, pick_device, report  # noqa: E402


def shapes_images(n: int, resolution: int, seed: int = 0):
    from t2i_recap.shapes.render import render
    from t2i_recap.shapes.world import sample_scene

    rng = random.Random(seed)
    return [render(sample_scene(rng), resolution) for _ in range(n)]


def build_model(args, tmp: Path) -> str:
    if args.model:
        return args.model
    from t2i_recap.captioner import tiny

    builder = {"llava": tiny.tiny_llava, "idefics3": tiny.tiny_idefics3}[args.family]
    return str(builder(tmp / args.family))


def run_mode(backend, images, prompt, batch_size, args):
    gens = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        gens += backend.caption(chunk, [prompt] * len(chunk), max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.max_new_tokens if args.force_length else 0)
    return time.perf_counter() - start, gens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="captioner folder (default: build a tiny random one)")
    p.add_argument("--family", default="llava", choices=["llava", "idefics3"], help="tiny random model family")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-sizes", default="4,8,32", help="comma-separated batch sizes to compare with 1")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--force-length", action="store_true",
                   help="generate exactly --max-new-tokens per image (min_new_tokens), as the reference H100 numbers")
    p.add_argument("--resolution", type=int, default=32, help="shapes image size in pixels")
    add_output_args(p)
    args = p.parse_args(argv)
    default_threads()
    device = pick_device(args.device)

    from t2i_recap.captioner.backend import TransformersBackend
    from t2i_recap.captioner.prompts import RECAP_PROMPT

    images = shapes_images(args.images, args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        backend = TransformersBackend(build_model(args, Path(tmp)), device=device)
        run_mode(backend, images[:2], RECAP_PROMPT, 2, args)  # warm-up: allocator, kernels, lazy imports
        base_s, base = run_mode(backend, images, RECAP_PROMPT, 1, args)
        rows = [_row("one at a time", 1, base_s, base, base_s, None)]
        for bs in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
            secs, gens = run_mode(backend, images, RECAP_PROMPT, bs, args)
            rows.append(_row("batched", bs, secs, gens, base_s, [g.text for g in gens] == [g.text for g in base]))
        model_name = args.model or f"tiny random {args.family} (t2i_recap.captioner.tiny)"
    report(f"Captioning on {device.type}: batched vs one at a time ({model_name})", rows,
           ["mode", "batch", "images", "seconds", "images/s", "new tokens/s", "speed-up", "same captions"], args, device,
           digits={"seconds": 2, "images/s": 2, "new tokens/s": 1, "speed-up": 2},
           notes=[f"{args.images} shapes images at {args.resolution} px, greedy, max_new_tokens {args.max_new_tokens}"
                  + (" (forced)" if args.force_length else ""), "prompt: the paper's recap prompt"])
    return 0


def _row(mode, bs, secs, gens, base_s, same):
    tokens = sum(g.num_tokens for g in gens)
    return {"mode": mode, "batch": bs, "images": len(gens), "seconds": secs, "images/s": len(gens) / secs,
            "new tokens/s": tokens / secs, "speed-up": base_s / secs, "same captions": same}


if __name__ == "__main__":
    raise SystemExit(main())
