"""Shared tail of the ``training/`` entry points: parse flags, run, fail in one line, tear down."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.failures import run_reporting_failures


def run_from_command_line(
    dataclass_types: Sequence[type],
    run: Callable[..., Any],
    *,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` into ``dataclass_types`` with ``HfArgumentParser`` and call ``run`` on them.

    Failures are reported by :func:`usfmae_hf.failures.report_failure`: expected ones print
    ``PROG: error: ...`` and return 2, unexpected ones one line and a traceback file (return 1;
    ``USFMAE_DEBUG=1`` prints the traceback), Ctrl-C returns 130. The
    ``torch.distributed`` process group (torchrun, accelerate launch) is destroyed on the way out,
    which avoids an occasional abort at interpreter exit.
    """

    def parse_and_run() -> None:
        from transformers import HfArgumentParser

        parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=list(argv) if argv is not None else None, return_remaining_strings=True
        )
        if unknown:
            raise UsfmaeError(f"unrecognized arguments: {' '.join(unknown)} (--help lists every flag)")
        run(*parsed)

    try:
        # Same failure path as the ``usfmae`` commands (set USFMAE_DEBUG=1 for tracebacks).
        return run_reporting_failures(parse_and_run, prog)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported: no process group to destroy
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
