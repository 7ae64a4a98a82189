"""Captioning throughput of `caption run --engine ray` vs the accelerate path, same shards, same workers.

Both runs are the real CLI in a subprocess, each from a cold start, on the same shapes-world shards
and the same captioner (default: a tiny random LLaVA-1.5-shaped model built under --out):

  accelerate  `accelerate launch --multi_gpu --num_processes W -m t2i_recap.captioner ...` (torchrun
              ranks; shard i on rank i % W), or one plain process for W = 1
  ray         `t2i-recap caption run --engine ray --workers W ...` (a local Ray instance started by
              the run; each free worker takes the next shard)

Columns: `wall s` is the whole command (interpreter, imports, Ray start-up, model loads, captioning);
`images/s` is images / wall; `busy images/s` is images / the captioning seconds of the busiest
worker (summed from the sidecars' `counts.seconds`), i.e. the rate without start-up costs; `same
captions` compares every row of the ray sidecars with the accelerate ones.

  python benchmarks/caption_engines.py --out /tmp/engines                       # 8 shards of 5, 2 workers
  python benchmarks/caption_engines.py --out /tmp/engines --shards 16 --workers 2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_args, pick_device, report  # noqa: E402

COLUMNS = ["engine", "workers", "shards", "images", "wall s", "images/s", "busy images/s", "same captions"]


def build_inputs(args, root: Path) -> tuple[Path, str]:
    """Shapes-world shards and the captioner (built once under `root`, reused by a later run)."""
    shards = root / "shards"
    if not list(shards.glob("*.tar")):
        from t2i_recap.shapes.make import make_dataset

        make_dataset(shards, args.shards * args.shard_size, seed=0, shard_size=args.shard_size, progress=False)
    found = len(list(shards.glob("*.tar")))
    if found != args.shards:
        raise SystemExit(f"{shards} holds {found} shards, not --shards {args.shards}: pass another --out")
    if args.model:
        return shards, args.model
    model = root / "tiny_llava"
    if not (model / "config.json").exists():
        from t2i_recap.captioner.tiny import tiny_llava
        from t2i_recap.shapes.tokenizer import build_tokenizer

        build_tokenizer(root / "tokenizer")
        tiny_llava(model, tokenizer_dir=root / "tokenizer")
    return shards, str(model)


def common_args(args, shards: Path, model: str, out: Path, device) -> list[str]:
    flags = ["--input", str(shards), "--out", str(out), "--model", model, "--batch-size", str(args.batch_size),
             "--max-new-tokens", str(args.max_new_tokens), "--dtype", "float32" if device.type == "cpu" else "auto"]
    return flags + (["--device", "cpu"] if device.type == "cpu" else [])


def engine_command(engine: str, args, shards: Path, model: str, out: Path, device) -> list[str]:
    flags = common_args(args, shards, model, out, device)
    if engine == "ray":
        gpus = ["--set", "ray_gpus_per_worker=0"] if device.type == "cpu" else []
        return [sys.executable, "-m", "t2i_recap.captioner", "--engine", "ray", "--workers", str(args.workers),
                *gpus, *flags]
    if args.workers == 1:
        return [sys.executable, "-m", "t2i_recap.captioner", *flags]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.workers),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "t2i_recap.captioner", *flags]


def run_engine(engine: str, args, shards: Path, model: str, root: Path, device) -> dict:
    out = root / engine
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} already holds sidecars (a rerun would skip them): pass a new --out")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cmd = engine_command(engine, args, shards, model, out, device)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"engine": engine, "workers": args.workers, "wall s": wall, **sidecar_stats(out, wall)}


def sidecar_stats(out: Path, wall: float) -> dict:
    import pyarrow.parquet as pq

    from t2i_recap.captioner.writer import read_info

    busy, images, rows = collections.Counter(), 0, {}
    for path in sorted(out.glob("*.parquet")):
        info = read_info(path)
        counts = info["counts"]
        busy[info["claim"]["pid"]] += counts["seconds"]
        images += counts["ok"] + counts["failed"]
        rows[path.stem] = pq.read_table(path, columns=["key", "re_caption"]).to_pylist()
    return {"shards": len(rows), "images": images, "images/s": images / wall,
            "busy images/s": images / max(busy.values()), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the shards, the captioner and both runs' sidecars")
    p.add_argument("--model", help="captioner folder (default: a tiny random LLaVA built under --out)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=5, help="images per shard")
    p.add_argument("--workers", type=int, default=2, help="accelerate processes = Ray workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_output_args(p)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    shards, model = build_inputs(args, root)
    results = [run_engine(engine, args, shards, model, root, device) for engine in ("accelerate", "ray")]
    reference = results[0]["rows"]
    for r in results:
        r["same captions"] = r.pop("rows") == reference
    report("Captioning engines: accelerate launch vs Ray, same shards and workers", results, COLUMNS, args, device,
           digits={"wall s": 1, "images/s": 2, "busy images/s": 2},
           notes=[f"{args.shards} shards of {args.shard_size} images, batch {args.batch_size}, "
                  f"{args.max_new_tokens} new tokens at most, {args.threads} torch thread(s) per worker"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
