"""The real trainer under accelerate's FSDP2 on CPU processes (gloo), for tests/test_fsdp.py.

    accelerate launch --config_file docs/accelerate/fsdp_dit_xl.yaml --num_machines 1 --num_processes 2 \\
        --machine_rank 0 --main_process_ip 127.0.0.1 --main_process_port PORT --mixed_precision no \\
        tests/fsdp_cpu_harness.py --config RUN.yaml [--resume latest] --report OUT.json

accelerate's launcher reads the documented FSDP config and starts the processes (torchrun) with its
FSDP environment. One thing is changed, accelerate's GPU-only gate: `AcceleratorState.__init__`
switches to DistributedType.FSDP only from an accelerator's distributed type (MULTI_GPU, MULTI_NPU,
...), never from MULTI_CPU, although torch's FSDP2 (`fully_shard`) runs on CPU with gloo. The
harness applies that same switch to MULTI_CPU; the trainer, the plugin and `prepare` are accelerate's
and the library's own. Launched without the FSDP environment (e.g. docs/accelerate/
cpu_two_processes.yaml) the switch does nothing and the run is plain DDP.

Each rank writes OUT.json.rank<N>: the distributed type, how many parameters are DTensor shards and
their local vs. global sizes (the test fails unless FSDP really sharded them), and the summary.
"""

from __future__ import annotations

import argparse
import functools
import json

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu() -> None:
    """Run the body of accelerate's FSDP switch (state.py, AcceleratorState.__init__) for MULTI_CPU."""
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def shard_report(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    params = list(trainer._bare().parameters())
    shards = [p for p in params if isinstance(p, DTensor)]
    return {"rank": trainer.rank, "world": trainer.world, "distributed_type": trainer.acc.distributed_type.value,
            "is_fsdp2": bool(trainer.acc.is_fsdp2), "params": len(params), "dtensor_params": len(shards),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "global_numel": sum(p.numel() for p in params),
            "ema_dtensors": sum(isinstance(v, DTensor) for v in trainer.ema.shadow.values()) if trainer.ema else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--resume-allow-changes", default=None, help="comma-separated keys, as t2i_recap.train takes")
    p.add_argument("--report", required=True)
    args = p.parse_args(argv)
    allow_fsdp_on_cpu()
    from t2i_recap.config import load_config
    from t2i_recap.logging_utils import setup_logging
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import Trainer

    setup_logging()
    allow = args.resume_allow_changes.split(",") if args.resume_allow_changes else None
    trainer = Trainer(load_config(TrainConfig, args.config), args.resume, allow)  # what t2i_recap.trainer.train does
    report = shard_report(trainer)  # before fit: a run that shards nothing fails the test, not just slowly
    report["summary"] = trainer.fit()
    with open(f"{args.report}.rank{trainer.rank}", "w") as fh:
        json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
