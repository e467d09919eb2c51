"""Find what to ingest: match the folders of ROOT to the catalogue, list their image files, cut them into chunks.

``ROOT`` holds one folder per dataset, named as in the catalogue (compared case- and
punctuation-insensitively, aliases allowed); folders outside the catalogue are ingested with the
generic rules and reported as unknown. Each dataset's image files (after the catalogue's rules) are
cut into chunks of :data:`FILES_PER_SHARD` files; a chunk's fingerprint (the rules, and the names,
sizes and modification times of its files) tells a rerun whether it must be decoded again.

Paths that cannot be read (dangling or looping symbolic links, files or folders without read
permission, FIFOs and other non-regular files) are listed as unreadable and skipped, never opened.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest.catalogue import DatasetEntry, find_entry, generic_entry, normalize_name
from usfmae_hf.io import SUPPORTED_SUFFIXES, file_suffix, is_dicom_file
from usfmae_hf.io.hdf5 import HDF5_SUFFIXES

__all__ = ["FILES_PER_SHARD", "Chunk", "DatasetSource", "SourceFile", "discover_sources", "split_into_chunks"]

#: Source files per chunk (one worker task, one shard, one manifest record).
FILES_PER_SHARD = 256
_REPORT_EXAMPLES = 5


@dataclass(frozen=True)
class SourceFile:
    """One candidate image file: path, POSIX path relative to ROOT, patient/group id, size and mtime when found."""

    path: Path
    relative: str
    group: str | None
    size: int
    mtime_ns: int


@dataclass
class DatasetSource:
    """A dataset folder under ROOT, the entry that ingests it, and what its rules kept and dropped."""

    folder: Path
    entry: DatasetEntry
    known: bool
    files: list[SourceFile] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    excluded_examples: dict[str, list[str]] = field(default_factory=dict)
    other_files: Counter = field(default_factory=Counter)
    unreadable: list[dict[str, str]] = field(default_factory=list)

    @property
    def slug(self) -> str:
        """File-name-safe form of the folder name (used for shard and manifest names)."""
        return re.sub(r"[^a-z0-9]+", "-", self.folder.name.lower()).strip("-") or "dataset"

    def summary(self) -> dict[str, Any]:
        """What the layout rules did to this folder, for the ingest report."""
        return {
            "dataset": self.entry.name,
            "folder": self.folder.name,
            "in_catalogue": self.known,
            "layout_rules": "dataset-specific" if self.entry.has_layout_rules else "generic",
            "files": len(self.files),
            "excluded_by_rules": dict(self.excluded),
            "excluded_examples": self.excluded_examples,
            "other_files": dict(self.other_files),
            "unreadable": self.unreadable,
        }


@dataclass(frozen=True)
class Chunk:
    """A worker task: up to :data:`FILES_PER_SHARD` files of one dataset folder."""

    key: str
    dataset: str
    folder: str
    files: tuple[SourceFile, ...]
    fingerprint: str


def _may_be_image(suffix: str, entry: DatasetEntry) -> bool:
    """Whether a file with ``suffix`` is a candidate (suffix-less files are, if they turn out to be DICOM)."""
    if suffix in HDF5_SUFFIXES:
        return "HDF5" in entry.formats
    return suffix in SUPPORTED_SUFFIXES or suffix == ""


def _why_unreadable(error: OSError, path: Path) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT and path.is_symlink():
        return "dangling symbolic link"
    return (error.strerror or type(error).__name__).lower()


def _stat_readable(path: Path) -> tuple[os.stat_result | None, str | None]:
    """``(stat, None)`` for a readable regular file (symbolic links followed), else ``(None, why not)``."""
    try:
        info = path.stat()
    except OSError as error:
        return None, _why_unreadable(error, path)
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"  # a FIFO would block the reader forever
    if not os.access(path, os.R_OK):
        return None, "permission denied"
    return info, None


def _scan_folder(source: DatasetSource, root: Path) -> None:
    """Fill ``source`` with the image files its entry's rules keep, counting what they drop and why."""

    def unreadable(path: Path, reason: str) -> None:
        source.unreadable.append({"path": path.relative_to(root).as_posix(), "reason": reason})

    def folder_error(error: OSError) -> None:
        folder = Path(error.filename)
        unreadable(folder, f"folder not readable ({_why_unreadable(error, folder)})")

    for directory, subdirs, names in os.walk(source.folder, onerror=folder_error):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(directory, name)
            suffix = file_suffix(path)
            if not _may_be_image(suffix, source.entry):
                source.other_files[suffix or "(none)"] += 1
                continue
            info, problem = _stat_readable(path)
            if suffix == "" and problem is None and not is_dicom_file(path):
                source.other_files["(none)"] += 1
                continue
            in_dataset = path.relative_to(source.folder).as_posix()
            reason = source.entry.exclusion_reason(in_dataset)
            if reason is not None:
                source.excluded[reason] += 1
                examples = source.excluded_examples.setdefault(reason, [])
                if len(examples) < _REPORT_EXAMPLES:
                    examples.append(in_dataset)
                continue
            if problem is not None:
                unreadable(path, problem)
                continue
            group = source.entry.group_of(in_dataset)
            source.files.append(
                SourceFile(path, path.relative_to(root).as_posix(), group, info.st_size, info.st_mtime_ns)
            )


def discover_sources(
    root: str | os.PathLike, *, datasets: Sequence[str] | None = None, include_heldout: bool = False
) -> tuple[list[DatasetSource], list[dict[str, str]]]:
    """Match the folders of ``root`` to the catalogue and list the image files of each.

    Args:
        root: folder holding one sub-folder per dataset.
        datasets: ingest only these (catalogue names, aliases or folder names); all when ``None``.
        include_heldout: also ingest the evaluation datasets (BUS-BRA, MMOTU-2D, GIST514-DB).

    Returns:
        The sources to ingest, and the folders skipped with the reason (``{"folder", "reason"}``).

    Raises:
        UsfmaeError: ``root`` is not a folder, or a requested dataset has no folder under it.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root}: not a folder")
    wanted = {normalize_name(name): name for name in datasets or ()}
    found: set[str] = set()
    sources, skipped = [], []
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        raise UsfmaeError(f"{root}: cannot list the folder ({error.strerror}); check its permissions") from None
    for folder in folders:
        entry = find_entry(folder.name)
        keys = {normalize_name(folder.name)} | (
            {normalize_name(n) for n in (entry.name, *entry.aliases)} if entry else set()
        )
        if wanted and not keys & wanted.keys():
            skipped.append({"folder": folder.name, "reason": "not selected (--datasets)"})
            continue
        found |= keys & wanted.keys()
        if entry is not None and entry.held_out and not include_heldout:
            skipped.append(
                {"folder": folder.name, "reason": f"{entry.name} is held out for evaluation (--include-heldout)"}
            )
            continue
        source = DatasetSource(folder, entry or generic_entry(folder.name), known=entry is not None)
        _scan_folder(source, root)
        sources.append(source)
    missing = [name for key, name in wanted.items() if key not in found]
    if missing:
        raise UsfmaeError(f"no folder under {root} for: {', '.join(missing)}")
    return sources, skipped


def split_into_chunks(source: DatasetSource, files_per_shard: int) -> Iterator[Chunk]:
    """The chunks of ``source``: consecutive runs of ``files_per_shard`` files, keyed ``<slug>-<NNNNN>``."""
    rules = repr(dataclasses.astuple(source.entry))
    for index, start in enumerate(range(0, len(source.files), files_per_shard)):
        files = tuple(source.files[start : start + files_per_shard])
        digest = hashlib.sha256(rules.encode())
        for file in files:
            digest.update(f"{file.relative}\0{file.size}\0{file.mtime_ns}\n".encode())
        yield Chunk(f"{source.slug}-{index:05d}", source.entry.name, source.folder.name, files, digest.hexdigest())
