"""`t2i-recap train --config FILE [--set k=v ...] [--resume latest|auto|DIR]`; also `accelerate launch -m t2i_recap.train`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError
from t2i_recap.logging_utils import setup_logging
from t2i_recap.train_config import TrainConfig


@dataclasses.dataclass
class TrainOptions:
    """How one `t2i-recap train` call starts (not part of the saved run config)."""

    resume: str | None = None
    """latest: continue from the newest checkpoint of the run folder (one must exist); auto: the same, or
    start fresh when there is none (for requeue scripts); DIR: a checkpoint folder."""
    resume_allow_changes: str | None = None
    """Resume although these config keys (comma-separated, e.g. objective.name,trainer.batch_size; a section
    name covers its keys) differ from the checkpoint's; 'all' allows any change."""

    def allowed_changes(self) -> bool | list[str] | None:
        if self.resume_allow_changes is None:
            return None
        text = self.resume_allow_changes.strip()
        return True if text == "all" else [k.strip() for k in text.split(",") if k.strip()]


FLAGS: dict[str, str] = {}  # every TrainConfig field through --config / --set
OPTIONS = {"--resume": "resume", "--resume-allow-changes": "resume_allow_changes"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap train", description="Train a text-to-image DiT (see configs/train/).")
    add_config_arguments(p, TrainConfig, FLAGS, config_required=True,
                         config_help="a shipped recipe name (e.g. recap_dit_b4_clip) or a YAML path")
    add_options(p, TrainOptions, OPTIONS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    from t2i_recap.caption_specs import CaptionSpecError
    from t2i_recap.sidecar_join import RecaptionCoverageError, SidecarMismatchError
    from t2i_recap.checkpoint import ResumeConfigError
    from t2i_recap.trainer import PREEMPTED_EXIT_CODE, NonFiniteLossError, Preempted, train

    try:
        cfg = config_from_args(TrainConfig, args)
        opts = options_from_args(TrainOptions, args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        summary = train(cfg, resume=opts.resume, allow_changes=opts.allowed_changes())
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
