"""`t2i-recap prepare --config FILE`: build the feature cache named by features.cache_dir.

Rebuilds only missing or stale shard files, so it can be rerun after a crash or after more shards
were recaptioned. Under `accelerate launch -m t2i_recap.prepare` the shards are split by rank.
Overlapping prepare processes on one cache folder build each shard once (per-shard claims,
`t2i_recap.claims`); a killed process's shard is taken over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from t2i_recap.claims import ClaimConfig, Claims
from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError
from t2i_recap.logging_utils import setup_logging
from t2i_recap.train_config import TrainConfig


FLAGS: dict[str, str] = {}  # every TrainConfig field through --config / --set
OPTIONS = {"--claim-heartbeat-s": "heartbeat_s", "--claim-stale-s": "stale_s"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap prepare", description=__doc__.splitlines()[0])
    add_config_arguments(p, TrainConfig, FLAGS, config_required=True,
                         config_help="the training YAML or recipe name (its data, text_encoder and features sections)")
    add_options(p, ClaimConfig, OPTIONS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        claim_cfg = options_from_args(ClaimConfig, args)
    except ConfigError as exc:
        p.error(str(exc))
    setup_logging()
    import torch

    from t2i_recap import cache
    from t2i_recap.caption_specs import CaptionSpecError
    from t2i_recap.buckets import enable_buckets
    from t2i_recap.data import build_source
    from t2i_recap.sidecar_join import RecaptionCoverageError, SidecarMismatchError

    try:
        cfg = config_from_args(TrainConfig, args)
    except ConfigError as exc:
        p.error(str(exc))
    if not cfg.features.cache_dir:
        raise ConfigError(f"{args.config}: features.cache_dir is not set; nothing to prepare")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    encoder = cache.FeatureEncoder(cfg.features, cfg.text_encoder, device)
    source = build_source(cfg.data)
    enable_buckets(cfg, encoder, source)  # data.aspect_buckets: the table is part of the fingerprint
    fp_hash = cache.fingerprint_hash(encoder.fingerprint(cfg.data))
    if rank == 0:
        cache.write_fingerprint(encoder, cfg.data, cfg.features.cache_dir)
    claims = Claims(cfg.features.cache_dir, claim_cfg)
    try:
        summary = cache.prepare_cache(encoder, source, cfg.data, cfg.features.cache_dir, rank=rank, world=world,
                                      fp_hash=fp_hash, claims=claims)
    except (SidecarMismatchError, RecaptionCoverageError, CaptionSpecError, FileNotFoundError) as exc:
        print(f"t2i-recap prepare: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"rank": rank, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
