"""`t2i-recap train --config FILE [--set k=v ...] [--resume latest|auto|DIR]`; also `accelerate launch -m t2i_recap.train`."""

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
    p.add_argument("--resume", default=None, metavar="latest|auto|DIR",
                   help="latest: continue from the newest checkpoint of the run folder (one must exist); auto: the "
                        "same, or start fresh when there is none (for requeue scripts); DIR: a checkpoint folder")
    p.add_argument("--resume-allow-changes", default=None, metavar="KEYS|all",
                   help="resume although these config keys (comma-separated, e.g. objective.name,trainer.batch_size; "
                        "a section name covers its keys) differ from the checkpoint's; 'all' allows any change")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from t2i_recap.caption_specs import CaptionSpecError
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.sidecar_join import RecaptionCoverageError, SidecarMismatchError
    from t2i_recap.checkpoint import ResumeConfigError
    from t2i_recap.trainer import PREEMPTED_EXIT_CODE, NonFiniteLossError, Preempted, train

    cfg = load_config(TrainConfig, args.config, args.set)
    allow = args.resume_allow_changes
    if allow is not None:
        allow = True if allow.strip() == "all" else [k.strip() for k in allow.split(",") if k.strip()]
    try:
        summary = train(cfg, resume=args.resume, allow_changes=allow)
    except Preempted as exc:  # SIGTERM/SIGINT: checkpoint saved; a requeue continues with --resume auto
        print(f"t2i-recap train: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except ResumeConfigError as exc:
        print(f"t2i-recap train: error: {exc}", file=sys.stderr)
        return 2
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
