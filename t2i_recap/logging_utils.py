"""Rank-aware logging: every process logs warnings, only rank 0 logs info."""

from __future__ import annotations

import logging
import os
import re


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


class _ClipInPixArtFilter(logging.Filter):
    """Drops diffusers' one warning that a PixArt pipeline holds a CLIPTextModel where its signature
    annotates T5EncoderModel. That pairing is this project's design (the paper's DiT reads CLIP text
    features), diffusers loads and runs it as is, and the check warns on every load, explicitly
    passed components included (diffusers' pipeline_utils type check). Every other record passes."""

    _PATTERN = re.compile(r"^Expected types for text_encoder: .*T5EncoderModel.*got .*CLIPText(Model|ModelWithProjection)")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._PATTERN.search(record.getMessage())


def install_library_filters() -> None:
    """Filters for known, understood library notices (idempotent)."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    if not any(isinstance(f, _ClipInPixArtFilter) for f in logger.filters):
        logger.addFilter(_ClipInPixArtFilter())


def setup_logging(level: int = logging.INFO) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s" if "RANK" in os.environ else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    install_library_filters()
