"""Shared tail of the ``training/`` entry points: parse flags, run, fail in one line, tear down."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from usfmae_hf.errors import UsfmaeError


def run_from_command_line(
    dataclass_types: Sequence[type],
    run: Callable[..., Any],
    *,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` into ``dataclass_types`` with ``HfArgumentParser`` and call ``run`` on them.

    Expected failures (:class:`UsfmaeError`) print ``PROG: error: ...`` and return 2. The
    ``torch.distributed`` process group (torchrun, accelerate launch) is destroyed on the way out,
    which avoids an occasional abort at interpreter exit.
    """
    import torch.distributed as dist
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    parsed = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    try:
        run(*parsed)
    except UsfmaeError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
