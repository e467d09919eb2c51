"""Sub-commands of the ``usfmae`` CLI: each module defines ``register(subparsers)``.

A registered parser must set ``func`` (via ``set_defaults``) to a callable taking the parsed
namespace and returning an exit status (``0``/``None`` for success).
"""

import argparse
import math

# Argument validators shared by the sub-commands, for ``add_argument(type=...)``: a bad value makes
# argparse print its usual ``usage`` and one-line ``error:`` and exit 2, before any work starts.


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, frame and slice strides)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def open_unit_fraction(text: str) -> float:
    """A float strictly between 0 and 1 (mask ratios); nan and inf are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, got {text}")
    return value


def torch_device(text: str) -> str:
    """A torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch  # only when the flag is given; every command using it loads torch anyway

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA GPU(s) are available")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: the Apple MPS backend is not available here (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise argparse.ArgumentTypeError(f"{text}: no {device.type} device is available here (use --device cpu)")
    return text
