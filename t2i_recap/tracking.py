"""Experiment trackers through accelerate (TensorBoard by default; wandb, comet_ml, mlflow, ... by name).

TensorBoard writes to RUN_DIR/logs as before. wandb honours its own environment (WANDB_MODE=offline,
WANDB_DIR); the resolved config is sent to every tracker but TensorBoard, whose hparams writer would
add a second event folder (the config is saved as RUN_DIR/config.yaml anyway).
"""

from __future__ import annotations

import math

import numpy as np

PROJECT = "logs"  # accelerate puts TensorBoard events in project_dir / project_name


def flat_config(d: dict, prefix: str = "") -> dict:
    """Nested config -> {"section.key": scalar}, lists as strings (trackers take scalars)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


def init_trackers(acc, config: dict) -> None:
    """Start the accelerator's trackers (main process only, as accelerate does)."""
    acc.init_trackers(PROJECT)
    flat = flat_config(config)
    for tracker in acc.trackers:
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(flat)


def log_scalars(acc, metrics: dict, step: int) -> None:
    """Scalars under train/ unless already namespaced; NaN (e.g. no grad norm) is left out."""
    values = {(k if "/" in k else f"train/{k}"): v for k, v in metrics.items()
              if not (isinstance(v, float) and math.isnan(v))}
    acc.log(values, step=step)


def log_image(acc, name: str, image, step: int) -> None:
    """One RGB image (PIL or HWC array) to every tracker that takes images."""
    array = np.asarray(image)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [array]}, step=step)


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker name accelerate does not know (before any work)."""
    from accelerate.utils import LoggerType

    known = sorted(t.value for t in LoggerType if t.value != "all")
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"trainer.log_with: unknown tracker(s) {bad}; accelerate knows {known}")
