"""What a launcher promised versus what it started, shared by every multi-process command.

`accelerate launch --cpu --num_processes N` starts ONE process in accelerate 1.x: its CPU launcher
hands multi-process jobs to MPI, and without MPI it runs the script once with MASTER_ADDR set but no
WORLD_SIZE. Going on would quietly do N processes' work in one. `check_cpu_launch` spots that case,
reads N the way the launcher did (accelerate's own parser over its command line, then its config
file), and replaces the process with `torch.distributed.run`
(torchrun) starting N gloo CPU processes of the same command, which is what the user asked for.
When N cannot be read, it refuses with the launch that works.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RELAUNCHED = "T2I_RECAP_CPU_RELAUNCH"


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def lost_processes() -> bool:
    """True for the single process `accelerate launch --cpu --num_processes N>1` starts without MPI."""
    mpi = any(v in os.environ for v in MPI_SIZE_VARS)
    return (_truthy(os.environ.get("ACCELERATE_USE_CPU")) and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ and not mpi)


def _launcher_args(cmdline: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` / `python -m accelerate.commands.launch` (None: not one)."""
    starts = [i for i, t in enumerate(cmdline) if t == "launch" or t.endswith("accelerate.commands.launch")]
    return cmdline[starts[0] + 1:] if starts else None


def requested_processes(cmdline: list[str], cwd: str | Path | None = None) -> int | None:
    """N as `accelerate launch` itself reads it from `cmdline`: its --num_processes, else the
    num_processes of its config file (--config_file, or accelerate's default one), None when absent.

    accelerate's own parser reads the command line, so options come in any order and a flag of the
    launched command (after `-m mod` / the script) is never read as the launcher's. `cwd` is the
    launcher's working folder, against which a relative --config_file is read."""
    args = _launcher_args(cmdline)
    if args is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.exit_on_error = False
    try:
        parsed = parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit):  # e.g. `--num_processes two`: the launcher refused it too
        return None
    if parsed.num_processes is not None:
        return parsed.num_processes
    return _config_file_processes(parsed, cwd)


def _config_file_processes(parsed: argparse.Namespace, cwd: str | Path | None) -> int | None:
    """num_processes from the config file accelerate launch reads for `parsed` (its own rule:
    --config_file, else the default file unless --cpu)."""
    from accelerate.commands.config import default_config_file
    from accelerate.commands.config.config_args import load_config_from_file

    path = parsed.config_file
    if path is not None and cwd is not None:
        path = str(Path(cwd, path))
    if path is None and (parsed.cpu or not os.path.isfile(default_config_file)):
        return None
    try:
        config = load_config_from_file(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"accelerate config file {path or default_config_file}: {exc}") from exc
    return getattr(config, "num_processes", None)


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent_cwd() -> str | None:
    try:
        return os.readlink(f"/proc/{os.getppid()}/cwd")
    except OSError:
        return None


def _this_command(module: str) -> list[str]:
    """How this process was started, minus the interpreter: `-m pkg.mod args` or `script.py args`
    (so `-m t2i_recap train ...` and `-m t2i_recap.train ...` both relaunch as themselves)."""
    rest = list(getattr(sys, "orig_argv", [])[1:])
    if rest and (rest[0] == "-m" or not rest[0].startswith("-")):
        return rest
    return ["-m", module, *sys.argv[1:]]


def torchrun_command(command: list[str], nproc: int) -> list[str]:
    """`command` (`-m pkg.mod args` or `script args`) as N torchrun processes on this machine."""
    port = os.environ.get("MASTER_PORT", "29500")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
            "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"), "--master_port", port, *command]


def check_cpu_launch(module: str) -> None:
    """Turn `accelerate launch --cpu --num_processes N` into N real CPU processes, or refuse it.

    Returns normally when the launch is sound (one process asked for, torchrun, MPI, GPUs). In the
    lost-processes case it execs torchrun (never returns) when N can be read from the launcher,
    else raises RuntimeError naming the launch that works.
    """
    if not lost_processes():
        return
    try:
        nproc = requested_processes(_parent_cmdline(), _parent_cwd())
        reason = ""
    except ValueError as exc:
        nproc, reason = None, f" ({exc})"
    if nproc and nproc > 1 and not os.environ.get(RELAUNCHED):
        cmd = torchrun_command(_this_command(module), nproc)
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        env[RELAUNCHED] = "1"  # a second lost launch refuses instead of looping
        print(f"t2i-recap: accelerate's --cpu launcher started one process for --num_processes {nproc}; "
              f"relaunching as {nproc} CPU processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
        os.execve(sys.executable, cmd, env)
    raise RuntimeError(
        "accelerate launch --cpu --num_processes N started a single process (accelerate's CPU launcher needs "
        f"MPI) and N could not be read from the launcher{reason}. Run `accelerate launch --multi_gpu --num_processes N "
        f"-m {module} ...` on a machine without GPUs, or `torchrun --nproc_per_node N -m {module} ...`.")
