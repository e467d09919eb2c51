"""DICOM files through pydicom: single frames and multi-frame cine loops.

Decoding (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE, big-endian) is pydicom's, with the
pylibjpeg plugins; ``iter_pixels`` also turns YBR into RGB (``as_rgb``, pydicom's
``convert_color_space``). What is left here is turning the decoded values into display RGB:
palette colour LUTs (8- or 16-bit entries, also of big-endian files), greyscale above 8 bits
through the modality and VOI (window) LUTs and then stretched from the frame's min/max to 0-255,
and MONOCHROME1 inversion. 8-bit greyscale and RGB are kept as stored, as a PNG export would be.

Pixel data larger than :data:`_DEFER_BYTES` are only read from the file once the header's decoded size
(rows x columns x frames x samples x bytes) has passed the size guard of :mod:`usfmae_hf.io.limits`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, iter_pixels

from usfmae_hf.errors import UnreadableImageError
from usfmae_hf.io.frame import Frame
from usfmae_hf.io.limits import check_decoded_size
from usfmae_hf.io.pixels import stretch_to_uint8, to_rgb_uint8

# Elements above this size are read when first used, so that the size guard runs before the pixel data are loaded.
_DEFER_BYTES = 1 << 20


def decoded_size(ds: pydicom.Dataset) -> int:
    """Bytes of all frames of ``ds`` decoded, from the header: rows x columns x frames x samples x bytes/sample."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
    bytes_per_sample = max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))  # 1-bit data unpack to a byte
    return rows * columns * frames * samples * bytes_per_sample


def _palette_luts_to_little_endian(ds: pydicom.Dataset) -> None:
    """Byte-swap 16-bit palette LUT data of a big-endian dataset in place.

    ``apply_color_lut`` reads (non-segmented) LUT data in native little-endian order whatever the
    transfer syntax, so a big-endian file would otherwise get a garbled palette.
    """
    if ds.original_encoding[1] is not False:
        return
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    entries = (descriptor[0] or 2**16) if descriptor else 0
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        data = ds.get(keyword)
        if data is not None and len(data) == 2 * entries:
            ds[keyword].value = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()


def dicom_frame_to_rgb(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Turn one decoded frame of ``ds`` (as pydicom returns it, YBR already as RGB) into ``(H, W, 3)`` uint8."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)[..., :3]  # an alpha LUT, if any, is dropped
        # 16-bit LUT entries: the high byte is the 8-bit colour (entries are v*257 or v<<8).
        return np.ascontiguousarray(rgb if rgb.dtype == np.uint8 else (rgb >> 8).astype(np.uint8))
    if pixels.ndim == 3:  # RGB (pydicom converted any YBR)
        bits = int(ds.get("BitsStored", 8))
        return to_rgb_uint8(pixels if bits <= 8 else (pixels >> (bits - 8)).astype(np.uint8))
    if pixels.dtype == np.uint8 and "ModalityLUTSequence" not in ds:
        grey = pixels
    else:
        grey = stretch_to_uint8(apply_voi_lut(apply_modality_lut(pixels, ds), ds))
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return to_rgb_uint8(grey)


def read_dicom_frames(path: Path, *, frame_stride: int = 1, max_decoded_bytes: int | None = None) -> Iterator[Frame]:
    """Yield every ``frame_stride``-th frame of a DICOM file as RGB uint8.

    A file whose header claims more than ``max_decoded_bytes`` of decoded pixels (see
    :func:`usfmae_hf.io.limits.check_decoded_size`) is refused before its pixel data are read.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise UnreadableImageError(f"{path}: DICOM file has no pixel data")
        check_decoded_size(path, decoded_size(ds), max_decoded_bytes)
        _palette_luts_to_little_endian(ds)
        num_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise UnreadableImageError(f"{path}: not a readable DICOM file ({error})") from None
    metadata = {
        "format": "DICOM",
        "num_frames": num_frames,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
        "modality": str(ds.get("Modality", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
    }
    indices = range(0, num_frames, frame_stride)
    try:
        for index, pixels in zip(indices, iter_pixels(ds, indices=list(indices))):
            yield Frame(dicom_frame_to_rgb(pixels, ds), index, dict(metadata))
    except (NotImplementedError, RuntimeError, ValueError, KeyError, AttributeError) as error:
        raise UnreadableImageError(f"{path}: cannot decode DICOM pixel data ({error})") from None
