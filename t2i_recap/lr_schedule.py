"""Learning-rate schedules from diffusers.optimization.get_scheduler, as a function of the step.

The trainer sets each step's lr from the restored step count, so a resumed run follows the same
curve with no scheduler object to pickle: the LambdaLR's whole state is its step (`last_epoch`),
which the checkpoint's JSON already holds. Warm-up follows diffusers: lr rises linearly from 0 at
step 0 to the peak at step `warmup_steps`.
"""

from __future__ import annotations

from typing import Callable

import torch

SCHEDULES = ("constant", "cosine", "linear")


def diffusers_name(schedule: str, warmup_steps: int) -> str:
    """diffusers' scheduler name for (schedule, warm-up): constant with warm-up is its own name there."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
    return "constant_with_warmup" if schedule == "constant" and warmup_steps else schedule


def lr_factor(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """step -> multiplier of the peak lr, taken from the LambdaLR diffusers builds."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # only its lambda is kept
    sched = get_scheduler(diffusers_name(schedule, warmup_steps), probe, num_warmup_steps=warmup_steps,
                          num_training_steps=max_steps)
    return sched.lr_lambdas[0]
