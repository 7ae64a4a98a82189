"""Trainer end to end: img/s of the real training loop from the feature cache, and the share of time it waits for data.

Runs `t2i_recap.trainer.Trainer(cfg).fit()` itself (the project's data loader, caption mixing, CFG
dropout, objective, accelerate, EMA) on a feature cache built by `t2i_recap.cache.prepare_cache`
from synthetic JPEG shards (benchmarks/synthetic.py: random shallow encoders of the real widths,
so cached rows have their real shapes). Every row is step "trainer": the real `Trainer.train_step`
under accelerate, with the EMA, gradient clipping, the non-finite check and padded captions (the
synthetic captions vary in length; the trainer trims the common padding, the rest stays masked).
Three things are wrapped, nothing is replaced:
  - the loader `fit()` builds (t2i_recap.trainer.make_loader) is wrapped to time every `next()`;
  - `train_step` is wrapped to count steps; the device is synchronised only at the start and the
    end of the timed steps (the step itself does not wait for the GPU between log steps), so
    step ms = timed wall time / steps;
  - `_host_side` is wrapped to record each micro-batch's real caption tokens (from the CPU masks),
    so TFLOP/s counts the tokens the model attends to, not padding.
A row with loader "mem" repeats the loader's first batch, so it is the trainer's own step cost (host
work, copies, EMA, clipping) without data; the gap to it is what the data path costs. The
end-of-run checkpoint is skipped (`--checkpoint` keeps it): it is a periodic cost, not a per-step
one. Warm-up steps (compilation, worker start-up) are excluded. The run summary's "speed" record
(compile, fast_blocks, device_skip) goes into the levers column.

  python benchmarks/trainer_e2e.py --size paper --device cuda --loaders mem 0 4 8
  python benchmarks/trainer_e2e.py --size tiny --device cpu --steps 3   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
import torch  # noqa: E402
from common import (H100_BF16_DENSE_TFLOPS, add_output_args, free_memory, is_oom, median,  # noqa: E402
                    peak_memory_gib, pick_device, report, reset_peak_memory, synchronize)

SIZES = {
    # 256 px, CLIP-L-width text, the paper's DiT-B/4; shards large enough that a step never waits on a shard boundary.
    "paper": dict(model="DiT-B/4", text="clip-l", resolution=256, image_size=384, samples=4096, shards=4, batch=256),
    "tiny": dict(model="DiT-tiny/2", text="clip-tiny", resolution=32, image_size=64, samples=48, shards=2, batch=4),
}


LEVER = {"auto": "auto", "on": True, "off": False}  # --compile / --fast-blocks -> the model config value


class TimedLoader:
    """Wraps a DataLoader; records how long each `next()` blocks."""

    def __init__(self, loader) -> None:
        self.loader, self.waits = loader, []

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - t0)
            yield batch


class RepeatBatch:
    """The loader's first batch, yielded forever: the trainer's step with data already in memory."""

    def __init__(self, loader) -> None:
        self.batch = next(iter(loader))

    def __iter__(self):
        return itertools.repeat(self.batch)


@contextlib.contextmanager
def instrumented(trainer_module, device, in_memory: bool = False):
    """Patch the trainer module's make_loader so the loader fit() builds is a TimedLoader
    (around a RepeatBatch when `in_memory`)."""
    loaders: list[TimedLoader] = []
    original = trainer_module.make_loader

    def make_loader(*args, **kwargs):
        loader = original(*args, **kwargs)
        trainer_module.pin_loader(loader, device)  # the trainer pins the loader it gets: this one is inside
        loaders.append(TimedLoader(RepeatBatch(loader) if in_memory else loader))
        return loaders[-1]

    trainer_module.make_loader = make_loader
    try:
        yield loaders
    finally:
        trainer_module.make_loader = original


def train_config(size: dict, work: Path, text_dir: Path, vae_dir: Path, *, workers: int, steps: int, device,
                 args, run: str):
    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig

    batch = size["batch"]
    cfg = {
        "data": {"shards": str(work / "shards"), "original_caption": "txt", "recaption": "json:re_caption",
                 "resolution": size["resolution"], "image_extensions": ["jpg"], "num_workers": workers,
                 "shuffle_buffer": 1000},
        "text_encoder": {"name_or_path": str(text_dir)},
        "features": {"vae": str(vae_dir), "dtype": "float16", "cache_dir": str(work / "cache")},
        "model": {"name": size["model"], "compile": LEVER[args.compile], "fast_blocks": LEVER[args.fast_blocks]},
        "trainer": {"run_dir": str(work / "runs" / run), "max_steps": steps, "batch_size": batch,
                    "micro_batch_size": batch, "mixed_precision": "bf16" if device.type == "cuda" else "no",
                    "log_every": 10},
        "checkpoint": {"every_steps": 10**9, "keep": 1},
        "validation": {"every_steps": -1},
    }
    return from_dict(TrainConfig, cfg, "trainer_e2e.py")


def real_tokens(trainer) -> list[float]:
    """Wrap `trainer._host_side` to record each micro-batch's mean real caption tokens (CPU masks of the
    chosen captions, the empty caption for CFG dropout): the tokens cross-attention really attends to."""
    from t2i_recap.mixing import NAMED_EMPTY

    seen: list[float] = []
    real = trainer._host_side

    def host_side(f, gen):
        out = real(f, gen)
        choice = out[0]  # a NamedChoice: per sample, the index of its caption or NAMED_EMPTY
        masks = torch.stack([f[f"{n}_mask"].cpu() for n in choice.names], dim=1)
        lengths = masks[torch.arange(masks.shape[0]), choice.index.clamp(min=0)].sum(1)
        lengths = torch.where(choice.index == NAMED_EMPTY, trainer.empty["mask"].sum(), lengths)
        seen.append(float(lengths.float().mean()))
        return out

    trainer._host_side = host_side
    return seen


def flops_per_image(model: str, text: str, latent: int, tokens: float) -> float:
    """Forward + backward FLOPs of one image with `tokens` real caption tokens, counted on fake tensors
    (train_step.counted_flops_per_image's method). FLOPs are linear in the caption length (K/V
    projections and cross-attention), so two counts give any mean length exactly."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import train_step

    case = train_step.Case(model, text, latent, 1)
    width = case.text_shape[1]

    def count(length: int) -> float:
        with FakeTensorMode(allow_non_fake_inputs=True):
            m = train_step.plain_model(case)
            x = torch.randn(1, train_step.LATENT_CHANNELS, latent, latent)
            emb = torch.randn(1, length, width)
            counter = FlopCounterMode(display=False)
            with counter:
                out = m(x, timestep=torch.ones(1) * 500.0, encoder_hidden_states=emb, added_cond_kwargs=None,
                        return_dict=False)[0]
                out.float().square().mean().backward()
        return float(counter.get_total_flops())

    f1, f2 = count(1), count(2)
    return f1 + (tokens - 1) * (f2 - f1)


def run_row(size: dict, work: Path, enc: tuple[Path, Path], loader: str, args, device) -> dict:
    """One row: `loader` is "mem" (one batch repeated: no data cost) or a data.num_workers count."""
    import t2i_recap.trainer as trainer_module

    in_memory = loader == "mem"
    workers = 0 if in_memory else int(loader)
    row = {"step": "trainer", "model": size["model"], "text": size["text"], "batch": size["batch"],
           "loader": "in memory" if in_memory else f"{workers} worker{'' if workers == 1 else 's'}"}
    run = "mem" if in_memory else f"w{workers}"
    shutil.rmtree(work / "runs" / run, ignore_errors=True)  # a rerun over the same --work starts clean
    cfg = train_config(size, work, *enc, workers=workers, steps=args.warmup + args.steps, device=device,
                       args=args, run=run)
    free_memory(device)
    reset_peak_memory(device)
    clock: list[float] = []  # synchronised wall times at the start and the end of the timed steps
    count = [0]
    try:
        trainer = trainer_module.Trainer(cfg)
        real_step = trainer.train_step
        tokens = real_tokens(trainer)

        def timed_step(batches):
            if count[0] == args.warmup:
                synchronize(device)
                clock.append(time.perf_counter())
            out = real_step(batches)
            count[0] += 1
            if count[0] == args.warmup + args.steps:
                synchronize(device)
                clock.append(time.perf_counter())
            return out

        trainer.train_step = timed_step
        if not args.checkpoint:
            trainer.save = lambda: None
        with instrumented(trainer_module, device, in_memory) as loaders:
            summary = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - keep the other rows
        if not is_oom(exc) and not args.keep_going:
            raise
        row["note"] = "out of memory" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        free_memory(device)
        return row
    waits = loaders[0].waits[args.warmup:args.warmup + args.steps]
    total = clock[1] - clock[0]
    mean_tokens = sum(tokens[args.warmup:]) / max(len(tokens[args.warmup:]), 1)
    flops = flops_per_image(size["model"], size["text"], size["resolution"] // 8, mean_tokens)
    img_s = size["batch"] * args.steps / total
    speed = summary.get("speed", {})
    row.update({"img/s": img_s, "step ms": 1e3 * total / args.steps, "data wait ms": 1e3 * median(waits),
                "wait %": 100 * sum(waits) / total, "real tokens": mean_tokens, "TFLOP/s": img_s * flops / 1e12,
                "MFU %": 100 * img_s * flops / 1e12 / args.peak_tflops, "peak GiB": peak_memory_gib(device),
                "levers": ", ".join([f"mixed_precision={cfg.trainer.mixed_precision}"]
                                    + [k for k in ("compile", "fast_blocks", "device_skip") if speed.get(k)])})
    free_memory(device)
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="paper")
    p.add_argument("--model", default=None, help="override the model, e.g. DiT-XL/2")
    p.add_argument("--batch", type=int, default=None, help="override the per-step batch")
    p.add_argument("--samples", type=int, default=None, help="override the number of synthetic samples")
    p.add_argument("--text", default=None, choices=sorted(synthetic.TEXT_ENCODERS),
                   help="override the text-feature width (e.g. t5-xxl: 120 x 4096 per caption)")
    p.add_argument("--loaders", nargs="+", default=["mem", "0", "4"],
                   help="one row each: 'mem' (the loader's first batch repeated: the step without data cost) or a "
                        "data.num_workers count")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="model.compile: auto = on CUDA")
    p.add_argument("--fast-blocks", choices=["auto", "on", "off"], default="auto",
                   help="model.fast_blocks: auto = on CUDA")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="dense bf16 peak of the card for MFU (default: H100 SXM)")
    p.add_argument("--keep-going", action="store_true", help="record a failing row and go on (OOM always does)")
    p.add_argument("--checkpoint", action="store_true", help="keep the end-of-run checkpoint (outside the timing)")
    p.add_argument("--work", default=None, help="folder for shards, encoders, cache and runs (default: temporary)")
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise SystemExit("the trainer runs on accelerate's device; select a GPU with CUDA_VISIBLE_DEVICES instead")
    if device.type == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would otherwise take a visible GPU
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    size = dict(SIZES[args.size])
    size.update({k: v for k, v in (("model", args.model), ("batch", args.batch), ("text", args.text),
                                                   ("samples", args.samples)) if v})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(args.work or tmp)
        synthetic.write_shards(work / "shards", samples=size["samples"], shards=size["shards"],
                               image_size=size["image_size"])
        enc = synthetic.write_encoders(work / "encoders", size["text"])
        t0 = time.perf_counter()
        synthetic.build_cache(work / "shards", *enc, work / "cache", resolution=size["resolution"],
                              device=str(device))
        prepare_s = time.perf_counter() - t0
        for loader in args.loaders:
            if loader != "mem" and not loader.isdigit():
                raise SystemExit(f"--loaders: {loader!r} is neither 'mem' nor a worker count")
            rows.append(run_row(size, work, enc, loader, args, device))
    notes = [f"{size['samples']} synthetic samples in {size['shards']} shards at {size['resolution']} px; cache built "
             f"by prepare_cache in {prepare_s:.1f} s (shallow random encoders: not a prepare benchmark).",
             f"{args.steps} timed steps after {args.warmup} warm-up, the device synchronised at both ends; wait % = "
             "time blocked in the loader's next() / timed wall time.",
             "TFLOP/s and MFU count forward + backward FLOPs at the mean real (unpadded) caption tokens of the timed "
             f"micro-batches (torch.utils.flop_counter on fake tensors), MFU against {args.peak_tflops:g} TFLOP/s.",
             "The end-of-run checkpoint is " + ("included in the run but not the timing." if args.checkpoint
                                                 else "skipped (--checkpoint keeps it).")]
    columns = ["step", "model", "text", "batch", "loader", "img/s", "step ms", "data wait ms", "wait %", "real tokens",
               "TFLOP/s", "MFU %", "peak GiB", "levers", "note"]
    report("trainer end to end", rows, columns, args, device,
           digits={"peak GiB": 2, "data wait ms": 2, "real tokens": 1, "TFLOP/s": 3, "MFU %": 2}, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
