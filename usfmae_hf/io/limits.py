"""The size guard of the readers: how many bytes of decoded pixels one file may hold.

Headers can claim anything: a 40 KB RLE DICOM whose header says 65535 x 65535 makes a decoder
allocate 4 GiB before it notices the data are short. So every reader of a multi-frame or 3-D format
(DICOM, volumes, videos) computes the decoded size from the header alone (rows x columns x frames x
samples x bytes per sample) and refuses a file over the limit with :class:`DecodedSizeError`, an
:class:`~usfmae_hf.errors.UnreadableImageError`, so that batch jobs skip it like any unreadable file.
A ``MemoryError`` while decoding is turned into the same kind of skip (:func:`memory_errors_as_unreadable`).

The limit, :data:`DEFAULT_MAX_DECODED_BYTES` (2 GiB) unless the ``USFMAE_MAX_DECODED_MB`` environment
variable or a caller's ``max_decoded_bytes`` says otherwise, is sized for the 24 GB, 2-core machines
the package is built for: a reader holds at most about twice the decoded array (SimpleITK's image
and its numpy copy), its uint8 copy and small per-slice temporaries (``stretch_to_uint8`` works block
by block), so two decoding processes stay near 10 GB at worst, while the largest files of the
OpenUS-46 datasets (ACOUSLIC-AI sweeps, 744 x 562 x 840 uint8 = 335 MiB; cine loops of a few hundred
800 x 600 RGB frames) are well inside it. Videos and compressed DICOM cines are decoded frame by
frame, but callers keep what they decode of a file (ingest holds a file's rows until it is done), so
their total counts too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io.frame import Frame

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "MAX_DECODED_ENV",
    "DecodedSizeError",
    "check_decoded_size",
    "max_decoded_bytes",
    "memory_errors_as_unreadable",
]

#: Largest decoded pixel size of one file, in bytes, unless overridden.
DEFAULT_MAX_DECODED_BYTES = 2 * 1024**3
#: Environment variable overriding :data:`DEFAULT_MAX_DECODED_BYTES`, in MiB (2**20 bytes).
MAX_DECODED_ENV = "USFMAE_MAX_DECODED_MB"
_MIB = 1024**2


def _size(nbytes: int) -> str:
    return f"{nbytes / _MIB:,.0f} MiB" if nbytes >= _MIB else f"{nbytes:,} bytes"


class DecodedSizeError(UnreadableImageError):
    """A file whose header claims more decoded pixel bytes than the limit; ``decoded_bytes`` is the claim."""

    def __init__(self, message: str, decoded_bytes: int) -> None:
        super().__init__(message)
        self.decoded_bytes = decoded_bytes

    def __reduce__(self):
        return type(self), (str(self), self.decoded_bytes)


def max_decoded_bytes(value: int | None = None) -> int:
    """The limit in bytes: ``value`` if given, else ``USFMAE_MAX_DECODED_MB`` (MiB), else the default.

    Raises:
        UsfmaeError: ``value`` or the environment variable is not a positive number.
    """
    if value is not None:
        if value < 1:
            raise UsfmaeError(f"the decoded-size limit must be a positive number of bytes, got {value}")
        return int(value)
    text = os.environ.get(MAX_DECODED_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_DECODED_BYTES
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = 0.0
    if not 0 < megabytes < float("inf") or megabytes * _MIB < 1:
        raise UsfmaeError(f"{MAX_DECODED_ENV} must be a positive number of MiB, got {text!r}; fix or unset it")
    return int(megabytes * _MIB)


def check_decoded_size(path: Path, decoded_bytes: int, limit: int | None = None) -> None:
    """Refuse ``path`` (raise :class:`DecodedSizeError`) if its header's ``decoded_bytes`` exceed the limit.

    ``limit`` is resolved by :func:`max_decoded_bytes` (``None``: environment variable or default).
    """
    limit = max_decoded_bytes(limit)
    if decoded_bytes > limit:
        raise DecodedSizeError(
            f"{path}: decoded pixels would take {_size(decoded_bytes)}, over the limit of {_size(limit)} "
            f"(a corrupt header, or raise the limit with {MAX_DECODED_ENV})",
            decoded_bytes,
        )


def memory_errors_as_unreadable(path: Path, frames: Iterator[Frame]) -> Iterator[Frame]:
    """Yield ``frames``, turning a ``MemoryError`` of the decoder into an :class:`UnreadableImageError`."""
    try:
        yield from frames
    except MemoryError as error:  # numpy's _ArrayMemoryError included
        raise UnreadableImageError(
            f"{path}: out of memory while decoding ({str(error) or type(error).__name__})"
        ) from None
