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
from t2i_recap.config import ConfigError, load_config
from t2i_recap.logging_utils import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i-recap prepare", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the training YAML (its data, text_encoder and features sections)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--claim-heartbeat-s", type=float, default=ClaimConfig.heartbeat_s,
                   help="seconds between heartbeats of a held shard claim")
    p.add_argument("--claim-stale-s", type=float, default=None,
                   help="a claim without a heartbeat this long is taken over (default 10x the heartbeat)")
    args = p.parse_args(argv)
    try:
        claim_cfg = ClaimConfig(args.claim_heartbeat_s, args.claim_stale_s)
    except ValueError as exc:
        p.error(str(exc))
    setup_logging()
    import torch

    from t2i_recap import cache
    from t2i_recap.caption_specs import CaptionSpecError
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
