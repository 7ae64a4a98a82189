"""`t2i-recap prepare --config FILE`: build the feature cache named by features.cache_dir.

Rebuilds only missing or stale shard files, so it can be rerun after a crash or after more shards
were recaptioned. Under `accelerate launch -m t2i_recap.prepare` the shards are split by rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from t2i_recap.config import ConfigError, load_config
from t2i_recap.logging_utils import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i-recap prepare", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the training YAML (its data, text_encoder and features sections)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    setup_logging()
    import torch

    from t2i_recap import cache
    from t2i_recap.data import build_source
    from t2i_recap.sidecar_join import RecaptionCoverageError, SidecarMismatchError
    from t2i_recap.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.set)
    if not cfg.features.cache_dir:
        raise ConfigError(f"{args.config}: features.cache_dir is not set; nothing to prepare")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    encoder = cache.FeatureEncoder(cfg.features, cfg.text_encoder, device)
    source = build_source(cfg.data)
    fp_hash = cache.fingerprint_hash(encoder.fingerprint(cfg.data))
    if rank == 0:
        cache.write_fingerprint(encoder, cfg.data, cfg.features.cache_dir)
    try:
        summary = cache.prepare_cache(encoder, source, cfg.data, cfg.features.cache_dir, rank=rank, world=world,
                                      fp_hash=fp_hash)
    except (SidecarMismatchError, RecaptionCoverageError, FileNotFoundError) as exc:
        print(f"t2i-recap prepare: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"rank": rank, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
