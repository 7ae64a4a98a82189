"""Full (unsharded) state of a model, its optimizer and tensors beside them, sharded by FSDP2 or not.

Checkpoints hold full tensors (t2i_recap/checkpoint.py), so a run saved under FSDP resumes in one
process and the reverse. Under FSDP2 (`torch.distributed.fsdp.fully_shard`, what accelerate's
`fsdp_version: 2` applies) every parameter is a DTensor shard, and gathering or cutting shards are
collectives: every rank calls these functions, in the same order. A model with no DTensor
parameter (one process, DDP) takes the plain `state_dict` path, unchanged.
"""

from __future__ import annotations

import torch

# torch.distributed.checkpoint and .tensor are imported where used: together they take ~0.7 s to
# import, which every config load would pay (EMAConfig lives beside the EMA).


def _options(gather: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # gather: full tensors to the CPU of rank 0 only (the others get empty dicts), one at a time.
    # Otherwise every rank passes the same full state (each reads the checkpoint) and keeps its shards.
    return StateDictOptions(full_state_dict=True, cpu_offload=gather)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def broadcast_weights(model: torch.nn.Module) -> None:
    """Give every rank rank 0's weights before sharding. DDP does this when it wraps a model;
    `fully_shard` keeps each rank's slice of its own init (seeded seed + rank), a patchwork."""
    with torch.no_grad():
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (under FSDP: every rank calls; rank 0 receives it on the CPU)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(gather=True))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(gather=False))


def optimizer_state(model: torch.nn.Module, opt) -> dict:
    """torch's integer-indexed optimizer state dict, full (under FSDP: every rank calls; rank 0
    receives it). `opt` may be accelerate's AcceleratedOptimizer."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, _torch_optimizer(opt), options=_options(gather=True))
    return _indexed(by_name) if by_name else {}


def load_optimizer_state(model: torch.nn.Module, opt, state: dict) -> None:
    """Load an integer-indexed full state dict (a checkpoint's, whoever wrote it)."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    opt = _torch_optimizer(opt)
    set_optimizer_state_dict(model, opt, _named(state, _param_names(model, opt)), options=_options(gather=False))


def gathered(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full tensor, on the CPU (a collective); any other tensor as it is."""
    return t.full_tensor().cpu() if _is_dtensor(t) else t


def shard_like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) cut to `ref`'s shard when `ref` is a DTensor; else `full`."""
    if not _is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    mesh = ref.device_mesh
    # src_data_rank=None: each rank slices its own copy, no communication.
    return distribute_tensor(full.to(mesh.device_type), mesh, ref.placements, src_data_rank=None)


def reshard(model: torch.nn.Module) -> None:
    """Drop the gathered weights FSDP2 keeps after a forward with no backward (validation).

    The root module's `reshard_after_forward` resolves to False, so after no-grad forwards its
    gathered weights stay registered, and the next forward skips the all-gather: a training step
    after validation with the EMA applied would compute with the EMA's root weights.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _torch_optimizer(opt) -> torch.optim.Optimizer:
    # accelerate's wrapper steps only on gradient-sync steps; the state-dict API's init step must run.
    return getattr(opt, "optimizer", opt)


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in torch's numbering (groups in order, then params)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def _indexed(by_name: dict) -> dict:
    """{"state": {fqn: ...}, "param_groups": [{"params": [fqn, ...]}]} -> torch's integer keys.
    Numbering follows the groups' order, as `Optimizer.state_dict` does."""
    order = [n for group in by_name["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def _named(indexed: dict, names: list[str]) -> dict:
    """The inverse of `_indexed`, given each index's parameter name."""
    if len(names) != sum(len(g["params"]) for g in indexed["param_groups"]):
        raise ValueError(f"optimizer state holds {sum(len(g['params']) for g in indexed['param_groups'])} "
                         f"parameters, the model {len(names)}")
    return {"state": {names[int(i)]: s for i, s in indexed["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in indexed["param_groups"]]}
