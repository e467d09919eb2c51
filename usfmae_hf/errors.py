"""Exception types whose messages are shown to users as one line (no traceback) by the CLI."""


class UsfmaeError(Exception):
    """Base class of all expected, user-facing failures."""


class CheckpointError(UsfmaeError):
    """A checkpoint is unreadable, unsafe, or not a (ViT-)MAE checkpoint."""


class VerificationError(UsfmaeError):
    """A converted model does not reproduce the reference implementation's numbers."""


class UnreadableImageError(UsfmaeError):
    """An image, DICOM, volume or video file cannot be decoded."""


class OutputExistsError(UsfmaeError):
    """An output path exists and overwriting was not requested."""
