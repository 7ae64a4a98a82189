"""Checkpoints: safetensors state dicts + one JSON file, written atomically and rotated.

A checkpoint is a folder `checkpoints/step-00001000/` holding model.safetensors, ema.safetensors,
optimizer.safetensors (tensors of the optimizer state) and state.json (step, optimizer hyper-
parameters, each rank's data cursor and RNG states, counters, the resolved config). It is written
under a temporary name and renamed into place, so a crash never leaves a half checkpoint that
`--resume latest` would pick. No pickle anywhere (checkpoints load without torch.load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from t2i_recap.io import normalize_modes
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N optimizer steps (and always at the end)."""
    keep: int = 3
    """Keep the newest N checkpoints; older ones are deleted after a new one is complete."""

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 1:
            raise ValueError(f"every_steps and keep must be >= 1, got {self.every_steps}, {self.keep}")


def rng_state() -> dict:
    """This process's RNG states as JSON-able lists."""
    np_state = np.random.get_state()
    out = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, name = flat.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    def all(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name))]
        return sorted((s, p) for s, p in found if (p / "state.json").is_file())

    def resolve(self, which: str) -> Path | None:
        """"latest" (the newest; one must exist), "auto" (the newest, or None: start fresh) or a checkpoint folder."""
        if which == "auto":
            found = self.all()
            return found[-1][1] if found else None
        if which == "latest":
            found = self.all()
            if not found:
                raise FileNotFoundError(f"--resume latest: no checkpoint in {self.dir}")
            return found[-1][1]
        path = Path(which)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"--resume {which}: not a checkpoint folder (no state.json)")
        return path

    def save(self, step: int, *, model: dict, ema: dict | None, optimizer: dict, state: dict) -> Path:
        """Write a complete checkpoint (main process only) and rotate old ones."""
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}-{os.getpid()}"
        # A run killed mid-save leaves its temp folder (another pid's name): a full checkpoint's worth
        # of disk per crash. Only the main process of the one run owning this folder saves here.
        for stale in self.dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        opt_tensors, opt_rest = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_rest}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        normalize_modes(tmp)  # safetensors writes 0600; checkpoints get the mode of every other output
        if final.exists():  # the same step saved again (e.g. a rerun): the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._rotate()
        log.info("saved checkpoint %s", final)
        return final

    def _rotate(self) -> None:
        for _, path in self.all()[: -self.cfg.keep]:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def load(path: str | Path) -> dict:
        """{"model", "ema" (or None), "optimizer" (a torch state dict), "state" (the JSON)}."""
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        opt = optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
        ema_file = path / "ema.safetensors"
        return {"model": load_file(str(path / "model.safetensors")),
                "ema": load_file(str(ema_file)) if ema_file.is_file() else None,
                "optimizer": opt, "state": state}


# Config keys (dotted, or a whole section) whose change keeps a resumed run exact: they steer how long,
# how often and where things are logged or saved, not what is trained. Every other key breaks exact
# resumption (model, objective, optimizer, batch sizes, data, features, mixing, seed, ...): a safe
# default, so a new config field is refused until it is known to be harmless.
HARMLESS_CHANGES = ("trainer.max_steps", "trainer.log_every", "trainer.run_dir", "trainer.on_nonfinite_loss",
                    "trainer.allow_tf32", "trainer.log_with", "validation", "checkpoint", "data.num_workers",
                    "model.compile", "model.fast_blocks")  # kernels, not the computation: float rounding only


HOLDOUT_KEY = "validation.holdout_shards"


def _held_out_shards(cfg: dict) -> int | None:
    """How many of data.shards the validation loss keeps out of training (None: none)."""
    v = cfg.get("validation") or {}
    if v.get("loss_every_steps", -1) < 0 or v.get("loss_shards"):
        return None
    return v.get("holdout_shards", 1)


class ResumeConfigError(ValueError):
    """The config to resume with differs from the checkpoint's in keys that break exact resumption."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (saved value, new value) for every key whose value differs (or exists on one side only)."""
    a, b = _flatten(saved), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(saved: dict | None, new: dict, allow: bool | list[str] | None = None) -> dict[str, tuple]:
    """Compare the checkpoint's resolved config with the new one before resuming.

    Changes to keys in HARMLESS_CHANGES (a whitelist by section or field) are allowed and returned;
    any other change raises ResumeConfigError naming the keys, unless `allow` is True (every change)
    or lists them (a key or a whole section). Returns all changes, for the log.
    """
    if saved is None:
        raise ResumeConfigError("the checkpoint holds no resolved config, so the resume cannot be checked; "
                                "pass --resume-allow-changes to resume anyway")
    changes = config_changes(saved, new)
    allowed = list(HARMLESS_CHANGES) + (list(allow) if isinstance(allow, (list, tuple)) else [])
    breaking = [k for k in changes if not _matches(k, allowed)]
    held = (_held_out_shards(saved), _held_out_shards(new))
    if held[0] != held[1]:  # validation settings, but they decide which shards train
        changes[HOLDOUT_KEY] = held
        if not _matches(HOLDOUT_KEY, allowed[len(HARMLESS_CHANGES):]) and HOLDOUT_KEY not in breaking:
            breaking.append(HOLDOUT_KEY)
    if breaking and allow is not True:
        detail = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in breaking)
        raise ResumeConfigError(
            f"--resume: the config differs from the checkpoint's in keys that break exact resumption: {detail}. "
            f"Restore them, or pass --resume-allow-changes {','.join(breaking)} (or --resume-allow-changes all) "
            "to resume anyway")
    return changes
