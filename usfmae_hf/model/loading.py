"""Quiet model loading for the cases where transformers' key report is expected noise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def quiet_loading_report() -> Iterator[None]:
    """Silence transformers' LOAD REPORT while loading a model whose unused weights are expected
    (e.g. an encoder or classifier taken from a ViTMAE directory that also holds the decoder)."""
    # Raising the modeling_utils level alone makes transformers 5 run (and log) its tensor-parallel
    # plan check, so that logger is muted too.
    names = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    loggers = [transformers_logging.get_logger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(transformers_logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
