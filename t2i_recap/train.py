"""`t2i-recap train --config FILE [--set k=v ...] [--resume latest]`; also `accelerate launch -m t2i_recap.train`."""

from __future__ import annotations

import argparse
import json
import sys

from t2i_recap.config import load_config
from t2i_recap.logging_utils import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap train", description="Train a text-to-image DiT (see configs/train/).")
    p.add_argument("--config", required=True, help="a shipped recipe name (e.g. recap_dit_b4_clip) or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set mixing.p=0.2 (repeatable)")
    p.add_argument("--resume", default=None, metavar="latest|DIR",
                   help="continue from the newest checkpoint of the run folder, or from a checkpoint folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from t2i_recap.caption_specs import CaptionSpecError
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.sidecar_join import RecaptionCoverageError, SidecarMismatchError
    from t2i_recap.trainer import NonFiniteLossError, train

    cfg = load_config(TrainConfig, args.config, args.set)
    try:
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as exc:  # a clear one-line reason, not a traceback
        print(f"t2i-recap train: error: {exc}", file=sys.stderr)
        return 3
    except (SidecarMismatchError, RecaptionCoverageError, CaptionSpecError) as exc:  # the data is not what it claims to be
        print(f"t2i-recap train: error: {exc}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("step", "samples", "run_dir")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
