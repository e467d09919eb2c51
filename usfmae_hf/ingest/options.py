"""The options of a dataset build (:class:`IngestOptions`), shared by the builder and its decode workers."""

from __future__ import annotations

from dataclasses import dataclass

from usfmae_hf.errors import UsfmaeError


@dataclass(frozen=True)
class IngestOptions:
    """Everything that changes the rows of a build; a build is only extended with the same options.

    Attributes:
        resize: store images resized to ``resize x resize`` with NEAREST (USF-MAE's first transform),
            or at full size when ``None``.
        frame_stride: keep every n-th frame of cines and videos.
        slice_stride: keep every n-th slice of volumes.
        near_dup_threshold: largest perceptual-hash Hamming distance (bits of 64) counted as a near
            duplicate; ``None`` turns near-duplicate removal off (exact duplicates are always removed).
        include_heldout: also ingest the evaluation datasets (BUS-BRA, MMOTU-2D, GIST514-DB).
    """

    resize: int | None = 224
    frame_stride: int = 1
    slice_stride: int = 1
    near_dup_threshold: int | None = 2
    include_heldout: bool = False

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize < 1:
            raise UsfmaeError(f"resize must be a positive size or None, got {self.resize}")
        if self.frame_stride < 1 or self.slice_stride < 1:
            raise UsfmaeError("frame and slice strides must be >= 1")
        if self.near_dup_threshold is not None and not 0 <= self.near_dup_threshold < 64:
            raise UsfmaeError(f"near-duplicate threshold must be in 0..63 bits, got {self.near_dup_threshold}")
