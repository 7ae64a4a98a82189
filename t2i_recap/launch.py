"""What a launcher promised versus what it started, shared by every multi-process command."""

from __future__ import annotations

import os

MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_cpu_launch(module: str) -> None:
    """Refuse `accelerate launch --cpu --num_processes N`, which silently starts ONE process.

    accelerate 1.x hands multi-process CPU jobs to MPI; without it the launcher runs a single process
    that sets MASTER_ADDR but no WORLD_SIZE. Going on would quietly do N processes' work in one.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    mpi = any(v in os.environ for v in MPI_SIZE_VARS)
    if use_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and not mpi:
        raise RuntimeError(
            "accelerate launch --cpu --num_processes N started a single process (accelerate's CPU launcher needs "
            f"MPI). For N CPU processes run `accelerate launch --multi_gpu --num_processes N -m {module} ...` on a "
            f"machine without GPUs, or `torchrun --nproc_per_node N -m {module} ...`.")
