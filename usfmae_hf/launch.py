"""Shared tail of the entry points: parse flags, run quietly, fail in one line, tear down.

:func:`run_from_command_line` is the whole ``main`` of the ``training/`` scripts (and of the
``usfmae pretrain|finetune|finetune-segmentation`` commands); :func:`library_progress_bars` is how
they and the ``usfmae`` commands hide the progress bars that libraries draw for local work.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.failures import OneLineArgumentErrors, run_reporting_failures

VERBOSE_ENVIRONMENT_VARIABLE = "USFMAE_VERBOSE"
# The users' own switches: when set, they decide and the package leaves those libraries alone.
_HUB_VARIABLE = "HF_HUB_DISABLE_PROGRESS_BARS"
_DATASETS_VARIABLE = "HF_DATASETS_DISABLE_PROGRESS_BARS"


def verbose_requested(flag: bool = False) -> bool:
    """``True`` if ``-v`` was given (``flag``) or ``USFMAE_VERBOSE`` is set to a true value."""
    value = os.environ.get(VERBOSE_ENVIRONMENT_VARIABLE, "").strip().lower()
    return flag or value not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def library_progress_bars(show: bool) -> Iterator[None]:
    """Hide, unless ``show``, the progress bars that libraries draw for local work while the block runs.

    transformers' "Loading weights", datasets' "Generating train split", "Map" and "Downloading data"
    (drawn even for local files) and huggingface_hub's bars: noise next to the package's own output,
    whose own bars (``features``, ``ingest``, the training loops) are not affected. Afterwards every
    library is as it was, with one exception: datasets, if first imported inside the block, reads its
    switch (``HF_DATASETS_DISABLE_PROGRESS_BARS``, set for the block) once and keeps its bars hidden
    for the life of the process, as befits a command-line process. A switch the user set wins.
    """
    if show:
        yield
        return
    from huggingface_hub import utils as hub  # cheap (lazy); transformers copies its setting when imported

    hub_free, datasets_free = _HUB_VARIABLE not in os.environ, _DATASETS_VARIABLE not in os.environ
    hub_on = hub_free and not hub.are_progress_bars_disabled()
    transformers = sys.modules.get("transformers.utils.logging")
    transformers_on = hub_free and (transformers.is_progress_bar_enabled() if transformers else hub_on)
    datasets = sys.modules.get("datasets")
    datasets_on = datasets_free and datasets is not None and datasets.is_progress_bar_enabled()
    if transformers is not None and transformers_on:
        transformers.disable_progress_bar()  # huggingface_hub's too
    if hub_on:
        hub.disable_progress_bars()
    if datasets_on:
        datasets.disable_progress_bars()
    if datasets_free and datasets is None:
        os.environ[_DATASETS_VARIABLE] = "1"  # read once, when datasets is imported
    try:
        yield
    finally:
        if datasets_free and datasets is None:
            os.environ.pop(_DATASETS_VARIABLE, None)
        transformers = sys.modules.get("transformers.utils.logging")  # perhaps imported inside the block
        if transformers is not None and transformers_on:
            transformers.enable_progress_bar()  # huggingface_hub's too
        if hub_on:
            hub.enable_progress_bars()
        elif hub_free and transformers_on:
            hub.disable_progress_bars()  # off before the block: transformers' switch turned it on
        if datasets_on:
            datasets.enable_progress_bars()


def run_from_command_line(
    dataclass_types: Sequence[type],
    run: Callable[..., Any],
    *,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` into ``dataclass_types`` with ``HfArgumentParser`` and call ``run`` on them.

    Failures are reported by :func:`usfmae_hf.failures.report_failure`: expected ones (command-line
    mistakes included) print one line ``PROG: error: ...`` and return 2, unexpected ones one line and a
    traceback file (return 1; ``USFMAE_DEBUG=1`` prints the traceback), Ctrl-C returns 130. Library
    progress bars are hidden (``USFMAE_VERBOSE=1`` shows them; see :func:`library_progress_bars`). The
    ``torch.distributed`` process group (torchrun, accelerate launch) is destroyed on the way out,
    which avoids an occasional abort at interpreter exit.
    """

    def parse_and_run() -> None:
        from transformers import HfArgumentParser

        class Parser(OneLineArgumentErrors, HfArgumentParser):
            """``HfArgumentParser`` whose command-line errors are one line."""

        parser = Parser(dataclass_types, prog=prog, description=description)
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=list(argv) if argv is not None else None, return_remaining_strings=True
        )
        if unknown:
            raise UsfmaeError(f"unrecognized arguments: {' '.join(unknown)} (--help lists the options)")
        run(*parsed)

    try:
        # Same failure path as the ``usfmae`` commands (set USFMAE_DEBUG=1 for tracebacks).
        with library_progress_bars(verbose_requested()):
            return run_reporting_failures(parse_and_run, prog)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group to destroy
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
