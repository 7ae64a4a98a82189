"""Peak RSS of captioning and of feature-cache building, for a small and a 10x larger shapes dataset.

    python benchmarks/memory_rss.py --sizes 10000 100000 --work /tmp/t2i_rss

Bounded memory means the peak stays flat as the dataset grows: both jobs stream shard by
shard, so their peak depends on the shard size, not on the number of shards. Each job runs as
its own process (the real CLIs: `python -m t2i_recap.captioner`, `python -m t2i_recap.prepare`) and
its peak resident set size is read from the kernel when it exits (`wait4` rusage, ru_maxrss).

The models are tiny and random (a 16 px LLaVA-shaped captioner generating `--max-new-tokens`
tokens for a one-word prompt, a one-layer CLIP text tower reading 16 tokens, a VAE), so the run
fits a 2-core CPU; the memory behaviour under
test is the pipeline's (readers, prefetch, sidecar rows, cache shards), not the model's. The larger
dataset is generated once; the smaller one is its first shards (a brace pattern).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def build_models(work: Path) -> dict[str, Path]:
    """Tiny random captioner, CLIP text encoder and VAE, saved with save_pretrained (reused if present)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from t2i_recap.captioner.tiny import tiny_llava
    from t2i_recap.shapes.tokenizer import build_tokenizer

    paths = {name: work / "models" / name for name in ("tokenizer", "llava", "clip", "vae")}
    if all((p / "config.json").exists() for n, p in paths.items() if n != "tokenizer"):
        return paths
    torch.manual_seed(0)
    build_tokenizer(paths["tokenizer"])
    # 16 px, 4 image tokens, one layer: the pipeline's memory is under test, not the model's
    tiny_llava(paths["llava"], tokenizer_dir=paths["tokenizer"], image_size=16, patch_size=8, hidden=16, layers=1)
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                  ).save_pretrained(str(paths["clip"]))
    tok.save_pretrained(str(paths["clip"]))
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(str(paths["vae"]))
    return paths


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; returns its wall time and peak RSS (MiB, from the kernel's rusage of that process)."""
    # one thread: tiny models gain nothing from more, and a shared box punishes oversubscription
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {code}; see {log}")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1)}


def shard_pattern(shards: Path, n: int, shard_size: int) -> str:
    last = (n + shard_size - 1) // shard_size - 1
    return str(shards / ("00000.tar" if last == 0 else f"{{00000..{last:05d}}}.tar"))


def measure(n: int, args, models: dict[str, Path], shards: Path) -> dict:
    work = Path(args.work)
    pattern = shard_pattern(shards, n, args.shard_size)
    caps, cache = work / f"captions_{n}", work / f"cache_{n}"
    caption = run_measured([sys.executable, "-m", "t2i_recap.captioner", "--input", pattern, "--out", str(caps),
                            "--model", str(models["llava"]), "--batch-size", str(args.batch_size),
                            "--max-new-tokens", str(args.max_new_tokens), "--dtype", "float32",
                            "--template", "Describe."],
                           work / f"caption_{n}.log")
    cfg = {"data": {"shards": pattern, "resolution": args.resolution, "original_caption": "txt",
                    "recaption": "sidecar:re_caption", "recaption_dir": str(caps)},
           "text_encoder": {"name_or_path": str(models["clip"]), "max_length": args.max_text_tokens},
           "features": {"vae": str(models["vae"]), "cache_dir": str(cache), "dtype": "float16",
                        "encode_batch_size": args.batch_size}}
    cfg_file = work / f"prepare_{n}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    prepare = run_measured([sys.executable, "-m", "t2i_recap.prepare", "--config", str(cfg_file)],
                           work / f"prepare_{n}.log")
    return {"samples": n, "shards": (n + args.shard_size - 1) // args.shard_size, "caption": caption,
            "cache": prepare}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="dataset sizes (samples)")
    p.add_argument("--work", default="/tmp/t2i_rss", help="scratch folder (datasets, outputs, logs)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--resolution", type=int, default=16, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=64, help="captioner and encoder batch size")
    p.add_argument("--max-new-tokens", type=int, default=2, help="tokens the tiny captioner generates per image")
    p.add_argument("--max-text-tokens", type=int, default=16, help="text encoder tokens per caption in the cache")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    from t2i_recap.shapes.make import make_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work)
    shards = work / "shards"
    started = time.perf_counter()
    make_dataset(shards, max(args.sizes), seed=0, curated_fraction=0.0, resolution=args.resolution,
                 shard_size=args.shard_size, workers=min(2, os.cpu_count() or 1), progress=False)
    print(f"dataset: {max(args.sizes)} samples in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = []
    for n in sorted(args.sizes):
        rows.append(measure(n, args, models, shards))
        print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"Command: `python benchmarks/memory_rss.py {shlex.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| samples | shards | captioning peak RSS (MiB) | captioning time (s) | cache building peak RSS (MiB) "
             "| cache building time (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['samples']:,} | {r['shards']} | {r['caption']['peak_rss_mib']} | {r['caption']['seconds']} | "
              f"{r['cache']['peak_rss_mib']} | {r['cache']['seconds']} |" for r in rows]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
