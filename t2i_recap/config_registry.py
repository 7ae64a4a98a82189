"""Which root config class a YAML file in configs/ belongs to: its folder decides.

configs/train/*.yaml -> TrainConfig, configs/caption/<name>.yaml -> the captioner's run or
fine-tune config, configs/eval/*.yaml -> EvalConfig, configs/assets/*.yaml -> AssetsConfig.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# folder -> (file-name prefix -> "module:Class"); the longest matching prefix wins, "" is the default.
REGISTRY: dict[str, dict[str, str]] = {
    "train": {"": "t2i_recap.train_config:TrainConfig"},
    "caption": {"": "t2i_recap.captioner.run:CaptionRunConfig",
                "finetune": "t2i_recap.captioner.finetune:FinetuneConfig"},
    "eval": {"": "t2i_recap.evaluate.run:EvalConfig"},
    "assets": {"": "t2i_recap.shapes.assets:AssetsConfig"},
}


def config_class_for(path: str | Path) -> type:
    path = Path(path)
    folder = path.parent.name
    if folder not in REGISTRY:
        raise KeyError(f"{path}: configs must live in one of configs/{{{','.join(REGISTRY)}}}/")
    table = REGISTRY[folder]
    prefix = max((p for p in table if path.stem.startswith(p)), key=len)
    module, name = table[prefix].split(":")
    return getattr(importlib.import_module(module), name)
