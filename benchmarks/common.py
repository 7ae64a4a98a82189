"""Shared benchmark plumbing: device choice, timing (warm-up + median), FLOP counting, memory, tables.

Every benchmark script prints one Markdown table (and optionally appends it, with the environment, to
a file and writes JSON rows), so results paste straight into docs/PERFORMANCE.md with their card and
command. On a GPU, steps are timed with CUDA events recorded around each step on the current stream;
on a CPU with `time.perf_counter`. The median of the timed repeats is reported, after warm-up
repeats that absorb compilation, autotuning and allocator growth.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

# H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet: 1,979 TFLOP/s with 2:4 sparsity, half dense).
H100_BF16_DENSE_TFLOPS = 989.0


def pick_device(name: str = "auto") -> torch.device:
    """"auto" = the first CUDA device when there is one, else the CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to torch {torch.__version__}")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` for `repeats` timed calls after `warmup` untimed ones.

    On CUDA each call is bracketed by events on the current stream and the device is synchronised
    once at the end, so host-side launch overhead shows up only when the GPU actually waits on it.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn`, counted by torch.utils.flop_counter (matmuls, convs, attention).

    FlopCounterMode counts a multiply-add as 2 FLOPs and sees the backward pass when `fn` runs it,
    so forward + backward of a transformer comes out near 3x the forward (6 x params x tokens).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset (None on CPU: not tracked per run)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between rows, so one row's leftovers never limit the next."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def _script_path() -> str:
    """The running script relative to the repository root (benchmarks/x.py), as the docs quote it."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    return script.relative_to(root).as_posix() if script.is_relative_to(root) else script.as_posix()


def environment(device: torch.device) -> dict:
    """What a number depends on: card, software versions, and the exact command."""
    import diffusers
    import transformers

    env = {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "command": " ".join(shlex.quote(a) for a in ["python", _script_path(), *sys.argv[1:]])}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def fmt(value, digits: int = 1) -> str:
    """Table cell: numbers rounded with thousands separators, None as '-', strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[str], digits: dict[str, int] | None = None) -> str:
    from t2i_recap.markdown import md_table

    digits = digits or {}
    return "\n".join(md_table(list(columns), [[fmt(row.get(c), digits.get(c, 1)).replace("|", "\\|") for c in columns] for row in rows]))


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda, cuda:1 or cpu")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="also append the table, its title and the environment to FILE")
    parser.add_argument("--json", default=None, metavar="FILE", help="also append one JSON line per row to FILE")


def report(title: str, rows: list[dict], columns: Sequence[str], args: argparse.Namespace, device: torch.device,
           *, digits: dict[str, int] | None = None, notes: Sequence[str] = ()) -> str:
    """Print the table (stdout) and append it to --markdown / --json when given; returns the table."""
    env = environment(device)
    table = markdown_table(rows, columns, digits)
    text = f"### {title}\n\n{env['device']}; torch {env['torch']}\n\n{table}\n"
    for note in notes:
        text += f"\n- {note}"
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(text + f"\n\nCommand: `{env['command']}`\n\nEnvironment: `{json.dumps(env)}`\n\n")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({"benchmark": title, **row, "env": env}, default=str) + "\n")
    return table


def default_threads() -> None:
    """Respect an explicit OMP_NUM_THREADS; else leave torch's default (all cores). Used by caption_cpu.py."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
