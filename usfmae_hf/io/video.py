"""Videos (AVI, MP4, ...) through PyAV, decoded frame by frame.

Before the first frame is decoded, the stream's width x height x 3 bytes times its frame count (from
the container, else estimated from its duration and frame rate) goes through the size guard of
:mod:`usfmae_hf.io.limits`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io.frame import Frame
from usfmae_hf.io.limits import check_decoded_size
from usfmae_hf.io.pixels import import_optional


def _frame_count(container: Any, stream: Any) -> int:
    """Frames of ``stream``: the container's count, else duration x frame rate, else 1 (unknown)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate
    if rate and stream.duration and stream.time_base:
        return math.ceil(stream.duration * stream.time_base * rate)
    if rate and container.duration:
        return math.ceil(container.duration / 1_000_000 * rate)  # container.duration is in microseconds
    return 1


def read_video_frames(path: Path, *, frame_stride: int = 1, max_decoded_bytes: int | None = None) -> Iterator[Frame]:
    """Yield every ``frame_stride``-th frame of the first video stream as RGB uint8.

    A video whose RGB frames would take more than ``max_decoded_bytes`` in all
    (:func:`usfmae_hf.io.limits.check_decoded_size`) is refused before any frame is decoded.
    """
    try:
        av = import_optional("av", "video")
    except UsfmaeError as error:
        raise UnreadableImageError(f"{path}: {error}") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableImageError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rgb_bytes = stream.width * stream.height * 3 * _frame_count(container, stream)
            check_decoded_size(path, rgb_bytes, max_decoded_bytes)
            metadata = {
                "format": "video",
                "codec": stream.codec_context.name,
                "fps": float(stream.average_rate) if stream.average_rate else None,
                "num_frames": stream.frames or None,
            }
            for index, frame in enumerate(container.decode(stream)):
                if index % frame_stride == 0:
                    yield Frame(frame.to_ndarray(format="rgb24"), index, {**metadata, "time": frame.time})
    except av.FFmpegError as error:
        raise UnreadableImageError(f"{path}: cannot decode video ({error})") from None
