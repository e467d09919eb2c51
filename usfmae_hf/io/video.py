"""Videos (AVI, MP4, ...) through PyAV, decoded frame by frame."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io.frame import Frame
from usfmae_hf.io.pixels import import_optional


def read_video_frames(path: Path, *, frame_stride: int = 1) -> Iterator[Frame]:
    """Yield every ``frame_stride``-th frame of the first video stream as RGB uint8."""
    try:
        av = import_optional("av", "video")
    except UsfmaeError as error:
        raise UnreadableImageError(f"{path}: {error}") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableImageError(f"{path}: no video stream")
            stream = container.streams.video[0]
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
