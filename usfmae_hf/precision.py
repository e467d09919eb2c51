"""Compute precision: which dtype inference (and later training) runs in, chosen from what the hardware does fast.

``auto`` picks bfloat16 where it is fast and accurate enough: an x86 CPU with AMX or AVX-512 BF16 (bf16
matrix instructions), or a CUDA GPU of compute capability 8.0 or newer. ViT-B/16 features (2 threads,
``benchmarks/bench_inference.py``) came out 2.5-3.3x timm's float32 speed on an Intel Xeon with AMX and
2.2-2.4x on an AMD EPYC with AVX-512 BF16 but no AMX, with a cosine above 0.9999 to float32 on both.
Everywhere else (AVX2-only CPUs, older GPUs, Apple MPS) it picks float32: there bf16 is emulated and no
faster. float16 is refused on CPU: without AMX-FP16, torch's CPU float16 matrix product is emulated and
about 50x slower than float32.

CPU features are read from the ``flags`` lines of ``/proc/cpuinfo`` (what the kernel enables), or,
where that file does not exist (macOS, Windows), from torch's own CPUID queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from usfmae_hf.errors import UsfmaeError

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flag -> what it means, in order of preference for the one-line description.
_BF16_CPU_FLAGS = {"amx_bf16": "AMX", "amx_tile": "AMX", "avx512_bf16": "AVX-512 BF16"}
# The same features through torch's CPUID queries (private helpers; absent in some torch builds).
_BF16_TORCH_QUERIES = {"_is_amx_tile_supported": "AMX", "_is_avx512_bf16_supported": "AVX-512 BF16"}


@dataclass(frozen=True)
class Precision:
    """A resolved precision.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        dtype: the matching torch dtype.
        reason: why, e.g. ``"CPU has AMX"`` or ``"requested"``.
    """

    name: str
    dtype: torch.dtype
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The CPU feature flags of ``/proc/cpuinfo`` (all ``flags`` lines), or ``None`` where it is unreadable."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def _cpuinfo_field(name: str, cpuinfo: Path | None = None) -> str | None:
    """The first ``name`` line's value in ``/proc/cpuinfo``, or ``None`` (no such line, or no such file)."""
    try:
        for line in (cpuinfo or CPUINFO).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_name(cpuinfo: Path | None = None) -> str:
    """The CPU's model name (``model name`` in ``/proc/cpuinfo``), else the platform's processor string;
    benchmarks print it beside their figures."""
    import platform

    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine() or "unknown CPU"


def cpu_vendor(cpuinfo: Path | None = None) -> str | None:
    """The CPU's vendor id (``vendor_id`` in ``/proc/cpuinfo``: ``"GenuineIntel"``, ``"AuthenticAMD"``), or
    ``None`` where it is not known."""
    return _cpuinfo_field("vendor_id", cpuinfo)


# /proc/cpuinfo flag -> the vector / matrix feature it stands for, as benchmarks name them.
_CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}


def cpu_features(cpuinfo: Path | None = None) -> list[str]:
    """The CPU's vector and matrix features that decide inference speed, e.g. ``["AVX2", "AVX-512", "AMX"]``
    (empty where ``/proc/cpuinfo`` is unreadable); benchmarks print them beside their figures."""
    flags = cpu_flags(cpuinfo) or frozenset()
    return [feature for flag, feature in _CPU_FEATURES.items() if flag in flags]


def _cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bf16 fast here (``"AMX"``, ``"AVX-512 BF16"``), or ``None``."""
    flags = cpu_flags()
    if flags is not None:
        return next((feature for flag, feature in _BF16_CPU_FLAGS.items() if flag in flags), None)
    for query, feature in _BF16_TORCH_QUERIES.items():
        supported = getattr(torch.cpu, query, None)
        if supported is not None and supported():
            return feature
    return None


def bf16_support(device: str | torch.device | None = None) -> str | None:
    """Why bf16 is fast on ``device`` (default CPU), e.g. ``"CPU has AMX"``; ``None`` if it is not."""
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        feature = _cpu_bf16_feature()
        return f"CPU has {feature}" if feature else None
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has bf16"
    return None


def choose_precision(name: str | torch.dtype = "auto", device: str | torch.device | None = None) -> Precision:
    """Resolve ``name`` (``auto``, ``fp32``, ``bf16``, ``fp16``, or a torch dtype) for ``device`` (default CPU).

    Raises:
        ValueError: ``name`` is not a known precision.
        UsfmaeError: ``fp16`` on a CPU (emulated there: about 50x slower than fp32).
    """
    if isinstance(name, torch.dtype):
        matches = [key for key, dtype in DTYPES.items() if dtype == name]
        if not matches:
            raise ValueError(f"dtype must be one of {', '.join(map(str, DTYPES.values()))}, got {name}")
        name = matches[0]
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    device = torch.device(device or "cpu")
    if name == "fp16" and device.type == "cpu":
        raise UsfmaeError(
            "--dtype fp16 is not supported on CPU (emulated there: about 50x slower than fp32); "
            "use --dtype bf16 or fp32, or a GPU (--device cuda)"
        )
    if name != "auto":
        return Precision(name, DTYPES[name], "requested")
    reason = bf16_support(device)
    if reason:
        return Precision("bf16", torch.bfloat16, reason)
    if device.type == "cpu":
        return Precision("fp32", torch.float32, "CPU has no AMX or AVX-512 BF16")
    return Precision("fp32", torch.float32, f"no fast bf16 on {device}")


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype of :func:`choose_precision` ``(name, device)``."""
    return choose_precision(name, device).dtype


def describe_precision(name: str | torch.dtype = "auto", device: str | torch.device | None = None) -> str:
    """The decision of :func:`choose_precision` in one line, e.g. ``"bf16 (CPU has AMX)"``."""
    return str(choose_precision(name, device))
