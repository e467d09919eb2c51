"""Readers that turn ultrasound files into RGB uint8 frames.

One entry point, :func:`load_frames`, covers still images (PNG/JPEG/BMP/TIFF), DICOM (single frames
and cine loops), 3-D volumes (NIfTI, MHA/MHD, NRRD; as 2-D slices) and videos (AVI/MP4). Every
reader yields :class:`Frame` objects holding an ``(H, W, 3)`` uint8 RGB array, so everything
downstream (preprocessing, feature extraction, dataset building) sees one image type.

Corrupt or unsupported files raise :class:`~usfmae_hf.errors.UnreadableImageError` with the path and
the reason, so that batch jobs can report and skip them; so do files whose header claims more decoded
pixels than a limit (checked before any pixel is decoded, :mod:`usfmae_hf.io.limits`) and files whose
decoding runs out of memory.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io import limits
from usfmae_hf.io.frame import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    VIDEO_SUFFIXES,
    VOLUME_SUFFIXES,
    Frame,
    file_suffix,
    is_dicom_file,
)

__all__ = ["Frame", "SUPPORTED_SUFFIXES", "expand_inputs", "file_suffix", "is_dicom_file", "load_frames", "load_image"]


def load_frames(
    path: str | os.PathLike,
    *,
    frame_stride: int = 1,
    slice_stride: int = 1,
    axis: int = 0,
    max_decoded_bytes: int | None = None,
) -> Iterator[Frame]:
    """Yield the frames of an image, DICOM, volume or video file as RGB uint8 :class:`Frame` objects.

    Args:
        path: the file. The reader is chosen by suffix; files with another suffix (or none) are read
            as DICOM when they carry the ``DICM`` preamble.
        frame_stride: keep every n-th frame of DICOM cines and videos.
        slice_stride: keep every n-th slice of 3-D volumes.
        axis: volume axis (in the file's array order, 0-2) along which slices are taken.
        max_decoded_bytes: refuse DICOM, volume and video files whose header claims more decoded pixel
            bytes (all frames) than this; ``None``: ``USFMAE_MAX_DECODED_MB`` or 2 GiB
            (:func:`usfmae_hf.io.limits.max_decoded_bytes`). Still images have Pillow's own
            decompression-bomb limit.

    Raises:
        UnreadableImageError: the file is missing, corrupt, of an unsupported type, over the decoded-size
            limit (:class:`~usfmae_hf.io.limits.DecodedSizeError`), runs out of memory while decoding, or
            needs an optional dependency that is not installed (the message names the pip extra).
    """
    if frame_stride < 1 or slice_stride < 1:
        raise ValueError("frame_stride and slice_stride must be >= 1")
    path = Path(path)
    limit = limits.max_decoded_bytes(max_decoded_bytes)
    if not path.is_file():
        raise UnreadableImageError(f"{path}: no such file")
    suffix = file_suffix(path)
    if suffix in IMAGE_SUFFIXES:
        from usfmae_hf.io.images import read_image_frames

        frames = read_image_frames(path)
    elif suffix in DICOM_SUFFIXES or (suffix not in SUPPORTED_SUFFIXES and is_dicom_file(path)):
        from usfmae_hf.io.dicom import read_dicom_frames

        frames = read_dicom_frames(path, frame_stride=frame_stride, max_decoded_bytes=limit)
    elif suffix in VOLUME_SUFFIXES:
        from usfmae_hf.io.volumes import read_volume_frames

        frames = read_volume_frames(path, slice_stride=slice_stride, axis=axis, max_decoded_bytes=limit)
    elif suffix in VIDEO_SUFFIXES:
        from usfmae_hf.io.video import read_video_frames

        frames = read_video_frames(path, frame_stride=frame_stride, max_decoded_bytes=limit)
    else:
        raise UnreadableImageError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}")
    return limits.memory_errors_as_unreadable(path, frames)


def load_image(path: str | os.PathLike):
    """Return the first frame of ``path`` as an RGB ``PIL.Image.Image``."""
    from PIL import Image

    frames = load_frames(path)
    try:
        first = next(iter(frames))
    except StopIteration:
        raise UnreadableImageError(f"{path}: contains no frames") from None
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    return Image.fromarray(first.image, mode="RGB")


def _is_supported(path: Path) -> bool:
    return file_suffix(path) in SUPPORTED_SUFFIXES or is_dicom_file(path)


def _glob(pattern: str) -> list[Path]:
    """Matches of ``pattern``; ``**`` never descends into symlinked folders (through a loop it would not end)."""
    parts = Path(pattern).parts
    split = next((index for index, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    anchor = Path(*parts[:split]) if split else Path(".")
    rest = str(Path(*parts[split:])) if split < len(parts) else ""
    if not rest:
        return [anchor] if anchor.exists() else []
    return sorted(anchor.glob(rest))


def unique_real_files(paths: Iterable[Path]) -> list[Path]:
    """``paths`` with every real file once, in sorted path order.

    A file reached through symlinks keeps its shortest spelling that is not itself a symlink, if it has one.
    """
    chosen: dict[str, tuple[bool, int, Path]] = {}
    for path in paths:
        real = os.path.realpath(path)
        rank = (path.is_symlink(), len(path.parts), path)
        if real not in chosen or rank < chosen[real]:
            chosen[real] = rank
    return sorted(rank[-1] for rank in chosen.values())


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of unique files.

    A file reached by several spellings (symlinks, overlapping inputs) is listed once (see
    :func:`unique_real_files`); a glob's ``**`` does not descend into symlinked folders.

    Folders and glob matches keep only supported files (by suffix, or DICOM by the ``DICM`` preamble
    for files without a known suffix) and skip hidden names such as macOS ``._*`` files. A file named
    explicitly is kept whatever its type, so that an unsupported one is reported by
    :func:`load_frames` rather than silently dropped.

    Raises:
        UsfmaeError: an input is neither a file, a folder, nor a glob matching anything.
    """
    found: set[Path] = set()
    for item in inputs:
        item_path = Path(item)
        if item_path.is_file():
            found.add(item_path)
            continue
        if item_path.is_dir():
            candidates = (p for p in item_path.rglob("*") if p.is_file())
        else:
            matches = _glob(str(item))
            if not matches:
                raise UsfmaeError(f"{item}: no such file, folder, or matching glob")
            candidates = (
                p for match in matches for p in ([match] if match.is_file() else match.rglob("*")) if p.is_file()
            )
        found.update(p for p in candidates if not p.name.startswith(".") and _is_supported(p))
    return unique_real_files(found)
