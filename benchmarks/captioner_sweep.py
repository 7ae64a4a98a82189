"""Caption fidelity of the shapes world's tiny captioner across decoder sizes and data: a table.

Makes (or reuses) a curated training world with several gold wordings per image and the demo's
held-out test set (500 scenes, split "test", seed 0), then fine-tunes each variant with
`t2i-recap caption finetune` (configs/caption/finetune_shapes.yaml plus the variant's overrides),
several at once on one device, and scores each with `t2i-recap caption fidelity`. Prints a
Markdown table: exact scene-graph match on held-out 1-2-object scenes (the captioner's fidelity target), by
object count, and the training time. Writes OUT/sweep.json and OUT/sweep.md; `--pack BEST.tar`
also packs the best captioner folder into one tar file (one file is easy to copy off a remote machine).

  python benchmarks/captioner_sweep.py --out /tmp/sweep --device cuda --variants l2h128 l4h256
  python benchmarks/captioner_sweep.py --out /tmp/sweep --tiny        # CPU smoke test, ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "caption" / "finetune_shapes.yaml"
NARROW = ["build.hidden_size=128", "build.intermediate_size=256", "build.num_heads=4"]
WIDE = ["build.hidden_size=256", "build.intermediate_size=1024", "build.num_heads=8"]
# Overrides of configs/caption/finetune_shapes.yaml (each variant names its whole decoder shape).
VARIANTS = {
    "l2h128": [*NARROW, "build.num_layers=2"],
    "l4h128": [*NARROW, "build.num_layers=4"],
    "l4h256": [*WIDE, "build.num_layers=4"],
    "l6h256": [*WIDE, "build.num_layers=6"],
    "l4h256-tower": [*WIDE, "build.num_layers=4", "train.freeze_vision=false"],
    "l8h256": [*WIDE, "build.num_layers=8"],
    "l4h384": ["build.hidden_size=384", "build.intermediate_size=1536", "build.num_heads=6", "build.num_layers=4"],
}


def sh(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def make_worlds(args, data: Path) -> tuple[Path, Path, Path]:
    py = [sys.executable, "-m", "t2i_recap"]
    train, test, assets = data / "train", data / "test", data / "assets"
    jobs = [
        sh([*py, "shapes", "make", "--out", str(train), "--num", str(args.num_train), "--curated-fraction", "1.0",
            "--gold-captions", str(args.gold_captions), "--split", "train", "--workers", "4", "--no-progress"],
           data / "make_train.log"),
        sh([*py, "shapes", "make", "--out", str(test), "--num", str(args.num_test), "--curated-fraction", "1.0",
            "--split", "test", "--shard-size", str(args.num_test), "--no-progress"], data / "make_test.log"),
        sh([*py, "shapes", "assets", "--out", str(assets)], data / "assets.log"),
    ]
    for job in jobs:
        if job.wait():
            raise SystemExit(f"world making failed: {job.args} (see {data})")
    return train, test, assets


def one_to_two(fidelity: dict) -> dict:
    by = fidelity["by_object_count"]
    n = {k: by[k]["captions"] for k in ("1", "2") if k in by}
    exact = sum(by[k]["exact_match"] * n[k] for k in n) / max(sum(n.values()), 1)
    return {"exact_1_2": exact, "n_1_2": sum(n.values()),
            **{f"exact_{k}": by[k]["exact_match"] for k in by}, **{f"scene_{k}": by[k]["scene_match"] for k in by},
            "exact_all": fidelity["overall"]["exact_match"]}


def write_table(out: Path, args, rows: list[dict]) -> str:
    """OUT/sweep.json and OUT/sweep.md from the rows so far (rewritten after each variant, so a
    call stopped at its time limit still returns what finished)."""
    (out / "sweep.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [f"captioner sweep: {args.num_train} curated images x {args.gold_captions} wordings, {args.epochs} "
             f"epochs, batch {args.batch_size}, lr {args.lr}, device {args.device}; test: {args.num_test} held-out "
             "scenes (split test, seed 0)", "",
             "| variant | steps | train s | final loss | exact 1-2 obj | 1 obj | 2 obj | 2-obj scene | all (1-4) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k):
            return f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
        lines.append(f"| {r['variant']} | {r.get('steps', '-')} | {r.get('train_s', r['finetune_s'])} | "
                     f"{f('final_loss')} | {f('exact_1_2')} | {f('exact_1')} | {f('exact_2')} | {f('scene_2')} | "
                     f"{f('exact_all')} |")
    text = "\n".join(lines) + "\n"
    (out / "sweep.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=["l2h128", "l4h256", "l6h256", "l4h256-tower"],
                   choices=sorted(VARIANTS))
    p.add_argument("--num-train", type=int, default=20_000, help="curated training images")
    p.add_argument("--gold-captions", type=int, default=5, help="gold wordings per image")
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--parallel", type=int, default=4, help="fine-tunes at once")
    p.add_argument("--timeout", type=float, default=420, help="seconds per fine-tune before it is stopped")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--pack", help="tar file to pack the best captioner into")
    p.add_argument("--tiny", action="store_true", help="smoke sizes for a CPU check")
    args = p.parse_args(argv)
    if args.tiny:
        args.num_train, args.num_test, args.epochs, args.parallel = 64, 16, 1, 2
        args.set = [*args.set, "train.max_steps=3"]
    out = Path(args.out)
    train, test, assets = make_worlds(args, out / "data")
    py = [sys.executable, "-m", "t2i_recap", "caption"]
    pending = list(args.variants)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    rows = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            run = out / name
            sets = [*VARIANTS[name], "data.caption_field=gold_captions", f"train.epochs={args.epochs}",
                    f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"train.device={args.device}",
                    f"train.mixed_precision={args.mixed_precision}", *args.set]
            cmd = [*py, "finetune", "--config", str(BASE), "--shards", str(train), "--clip", str(assets / "clip"),
                   "--out", str(run / "captioner"), "--overwrite"] + [a for s in sets for a in ("--set", s)]
            running[name] = (sh(cmd, run / "finetune.log"), time.time())
        time.sleep(2)
        for name, (job, start) in list(running.items()):
            if job.poll() is None and time.time() - start < args.timeout:
                continue
            if job.poll() is None:
                job.kill()
                job.wait()
            del running[name]
            run = out / name
            row = {"variant": name, "overrides": VARIANTS[name], "finetune_exit": job.returncode,
                   "finetune_s": round(time.time() - start, 1)}
            if job.returncode == 0:
                summary = json.loads((run / "captioner" / "finetune.json").read_text())
                row.update(steps=summary["steps"], pairs=summary["pairs"], final_loss=summary["final_loss"],
                           train_s=summary["seconds"], parameters=summary["trainable_parameters"])
                fid = sh([*py, "fidelity", "--model", str(run / "captioner"), "--shards", str(test), "--out",
                          str(run / "fidelity"), "--batch-size", "256", "--max-new-tokens", "96"], run / "fidelity.log")
                if fid.wait() == 0:
                    row.update(one_to_two(json.loads((run / "fidelity" / "fidelity.json").read_text())))
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_table(out, args, rows)
    print(write_table(out, args, rows))
    scored = [r for r in rows if "exact_1_2" in r]
    if args.pack and scored:
        best = max(scored, key=lambda r: r["exact_1_2"])
        folder = out / best["variant"] / "captioner"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        with tarfile.open(args.pack, "w") as tar:
            if size < 15 * 2**20:
                tar.add(folder, arcname=f"captioner-{best['variant']}")
            else:
                for name in ("finetune.json", "finetune_config.yaml", "config.json"):
                    tar.add(folder / name, arcname=f"captioner-{best['variant']}/{name}")
            tar.add(out / best["variant"] / "fidelity", arcname=f"fidelity-{best['variant']}")
        print(f"packed {best['variant']} ({best['exact_1_2']:.3f}, weights {'in' if size < 15 * 2**20 else 'left out'}) "
              f"into {args.pack}")
    return 0 if scored else 1


if __name__ == "__main__":
    raise SystemExit(main())
