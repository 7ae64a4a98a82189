"""Rank-aware logging: every process logs warnings, only rank 0 logs info."""

from __future__ import annotations

import logging
import os


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: int = logging.INFO) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s" if "RANK" in os.environ else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S")
