"""Pickles recognised by their content, whatever the file is called; nothing is ever unpickled.

Four signatures are looked for, in a file's first bytes and (for zip archives) its central
directory: a zip archive holding a ``.pkl`` member (``torch.save``'s format since torch 1.6:
``<name>/data.pkl``), torch's legacy format (its magic number pickled first, at any protocol), a
pickle protocol header (``PROTO`` 2 to 5 followed by a valid opcode) and, for pickles of protocol 0
or 1, which have no header, a whole pickle at the start of the file: a stream of valid opcodes
ending in ``STOP`` with exactly one object on the stack, checked by :func:`pickletools.dis`, which
reads opcodes without running any. Text (Markdown, JSON, CSV, YAML, Python source) fails that check
at once: ``#``, ``{``, ``[``, ``-`` and ``"`` are no opcodes, and the letters that are need
arguments and stack contents that prose does not give them.
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Literal

# torch.serialization.MAGIC_NUMBER, the first object pickled into a legacy-format torch file.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# How the magic number is pickled: LONG1 (opcode 0x8a, 10 bytes) at protocol >= 2, a LONG text line below.
_MAGIC_LONG1 = b"\x8a\x0a" + TORCH_LEGACY_MAGIC.to_bytes(10, "little")
_MAGIC_TEXT = b"L%dL\n" % TORCH_LEGACY_MAGIC
_PROTO = 0x80
_PROTOCOLS = range(2, 6)
# A pickle's third byte is its first opcode after PROTO. A safetensors file starts with its header's
# length (a little-endian u64): its first two bytes can look like PROTO 2-5, but for a header under
# 2.6 MB its third byte is below 0x28, the lowest opcode, so no unpickler could read it.
_OPCODES = frozenset(opcode.code.encode("latin-1")[0] for opcode in pickletools.opcodes)
_HEAD_BYTES = 32  # PROTO (2) + FRAME (9) + the magic number's LONG1 (12) fit
# How much of a file the protocol 0/1 check reads: a valid opcode stream that long is a pickle too.
_LOW_PROTOCOL_SCAN_BYTES = 1 << 20
_PICKLE_MEMBER_SUFFIXES = (".pkl", ".pickle")

PickleFormat = Literal["torch-zip", "torch-legacy", "pickle"]


@dataclass(frozen=True)
class FoundPickle:
    """A pickle found in a file: its ``format`` and a phrase describing it for messages."""

    format: PickleFormat
    description: str


def find_pickle(path: str | os.PathLike) -> FoundPickle | None:
    """The pickle ``path`` holds (read from its first bytes and zip directory), or None.

    Raises:
        OSError: ``path`` cannot be read.
    """
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    member = _pickle_member(path)
    if member is not None:
        return FoundPickle("torch-zip", f"a zip archive holding the pickle {member} (torch.save's format)")
    is_protocol_header = len(head) >= 3 and head[0] == _PROTO and head[1] in _PROTOCOLS and head[2] in _OPCODES
    if head.startswith(_MAGIC_TEXT) or (is_protocol_header and _MAGIC_LONG1 in head):
        return FoundPickle("torch-legacy", "a legacy-format torch pickle")
    if is_protocol_header:
        return FoundPickle("pickle", f"a pickle (protocol {head[1]})")
    if head[:1] and head[0] in _OPCODES and _starts_with_a_pickle(path):
        return FoundPickle("pickle", "a pickle (protocol 0 or 1, which has no header)")
    return None


class _Discard(io.TextIOBase):
    """Where :func:`pickletools.dis` writes its listing: nowhere."""

    def write(self, text: str) -> int:
        return len(text)


def _starts_with_a_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with a whole pickle (or a valid opcode stream longer than the part read).

    :func:`pickletools.dis` checks each opcode, its argument, the stack and the memo, and that
    ``STOP`` leaves exactly one object; it only reads, nothing is imported or called.
    """
    with open(path, "rb") as handle:
        data = handle.read(_LOW_PROTOCOL_SCAN_BYTES + 1)
    stream = io.BytesIO(data[:_LOW_PROTOCOL_SCAN_BYTES])
    try:
        pickletools.dis(stream, out=_Discard())
    except Exception:  # any malformation: ValueError mostly, but argument decoding raises others
        # Still valid when the part read ran out: a pickle over a MiB (text never gets that far).
        return len(data) > _LOW_PROTOCOL_SCAN_BYTES and stream.tell() == _LOW_PROTOCOL_SCAN_BYTES
    return True


def _pickle_member(path: str | os.PathLike) -> str | None:
    """The first ``.pkl`` member named in a zip archive's central directory (nothing is extracted)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        return None  # an end-of-archive signature by chance (e.g. inside tensor data), not an archive
    return next((name for name in names if name.lower().endswith(_PICKLE_MEMBER_SUFFIXES)), None)
