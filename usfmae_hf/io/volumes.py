"""3-D volumes (NIfTI through nibabel; MHA/MHD/NRRD through SimpleITK) as 2-D slices.

Both libraries' arrays are put in SimpleITK's ``(z, y, x)`` order, so ``axis=0`` gives the
in-plane (x-y) images, rows along y, whichever format the volume came in. 2-D + time files
(e.g. CAMUS sequences) come out as one slice per time point along axis 0.

Both readers look at the header first (nibabel's shape and on-disk type, scaled data counted as
float64; SimpleITK's ``ReadImageInformation``) and refuse, through the size guard of
:mod:`usfmae_hf.io.limits`, a volume whose array would exceed the limit before reading its voxels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io.frame import Frame, file_suffix
from usfmae_hf.io.limits import check_decoded_size
from usfmae_hf.io.pixels import import_optional, stretch_to_uint8, to_rgb_uint8


def _read_nifti(path: Path, max_decoded_bytes: int | None) -> tuple[np.ndarray, tuple[float, ...], bool]:
    nibabel = import_optional("nibabel", "volumes")
    image = nibabel.load(str(path))  # the header only: voxels are read through image.dataobj
    proxy = image.dataobj
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    bytes_per_voxel = 8 if scaled else np.dtype(proxy.dtype).itemsize  # nibabel scales into float64
    check_decoded_size(path, math.prod(image.shape) * bytes_per_voxel, max_decoded_bytes)
    data = np.asanyarray(proxy)
    spacing = tuple(float(s) for s in image.header.get_zooms()[: data.ndim])
    # nibabel indexes (x, y, z); reverse to SimpleITK's (z, y, x).
    return data.transpose(tuple(reversed(range(data.ndim)))), tuple(reversed(spacing)), False


def _itk_component_bytes(pixel_type: str) -> int:
    """Bytes of one component of a SimpleITK pixel type such as ``"vector of 16-bit signed integer"``."""
    bits = re.search(r"(\d+)-bit", pixel_type)
    if bits is None:
        return 8  # an unknown type: count the widest scalar
    return int(bits.group(1)) // 8 * (2 if "complex" in pixel_type else 1)


def _read_itk(path: Path, max_decoded_bytes: int | None) -> tuple[np.ndarray, tuple[float, ...], bool]:
    sitk = import_optional("SimpleITK", "volumes")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    voxels = math.prod(reader.GetSize()) * reader.GetNumberOfComponents()
    check_decoded_size(path, voxels * _itk_component_bytes(pixel_type), max_decoded_bytes)
    image = reader.Execute()
    is_colour = image.GetNumberOfComponentsPerPixel() in (3, 4)
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing())), is_colour


def _as_3d(data: np.ndarray, is_colour: bool) -> np.ndarray:
    """Drop singleton dimensions and make 2-D images a one-slice volume (colour kept last)."""
    spatial = data.shape[:-1] if is_colour else data.shape
    spatial = tuple(size for size in spatial if size != 1) or (1, 1)
    data = data.reshape(spatial + data.shape[-1:] if is_colour else spatial)
    if len(spatial) == 2:
        data = data[None]
    if len(spatial) > 3:
        raise ValueError(f"{len(spatial)}-D volumes are not supported (shape {data.shape})")
    return data


def read_volume_frames(
    path: Path, *, slice_stride: int = 1, axis: int = 0, max_decoded_bytes: int | None = None
) -> Iterator[Frame]:
    """Yield every ``slice_stride``-th 2-D slice along ``axis`` of a NIfTI/MHA/MHD/NRRD volume.

    Intensities are stretched from the whole volume's min/max to 0-255 (uint8 volumes are kept as
    they are), so all slices of a volume share one grey scale. A volume whose header claims an array
    over ``max_decoded_bytes`` (:func:`usfmae_hf.io.limits.check_decoded_size`) is refused unread.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    reader = _read_nifti if file_suffix(path) in (".nii", ".nii.gz") else _read_itk
    try:
        data, spacing, is_colour = reader(path, max_decoded_bytes)
        volume = _as_3d(data, is_colour)
    except (UnreadableImageError, MemoryError):
        raise
    except UsfmaeError as error:
        raise UnreadableImageError(f"{path}: {error}") from None
    except Exception as error:  # nibabel and SimpleITK raise many types for corrupt files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise UnreadableImageError(f"{path}: cannot read volume ({reason})") from None
    if volume.dtype != np.uint8:
        volume = stretch_to_uint8(volume)
    num_slices = volume.shape[axis]
    metadata = {"format": "volume", "axis": axis, "num_slices": num_slices, "shape": list(volume.shape[:3])}
    metadata["spacing"] = list(spacing[-3:]) if len(spacing) >= 3 else list(spacing)
    for index in range(0, num_slices, slice_stride):
        yield Frame(to_rgb_uint8(np.take(volume, index, axis=axis)), index, dict(metadata))
