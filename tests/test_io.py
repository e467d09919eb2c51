"""Readers: real ultrasound DICOMs from pydicom-data and small image/volume/video files written here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io import SUPPORTED_SUFFIXES, Frame, expand_inputs, load_frames, load_image


def frames(path, **kwargs) -> list[Frame]:
    return list(load_frames(path, **kwargs))


def only_image(path) -> np.ndarray:
    (frame,) = frames(path)
    assert frame.image.dtype == np.uint8 and frame.image.ndim == 3 and frame.image.shape[-1] == 3
    assert frame.image.flags.c_contiguous
    return frame.image


# --- DICOM -------------------------------------------------------------------------------------


def test_same_scan_in_different_encodings_gives_identical_frames(ultrasound_dicoms):
    uncompressed = only_image(ultrasound_dicoms["US1_UNCR.dcm"])
    assert uncompressed.shape == (480, 640, 3)
    np.testing.assert_array_equal(only_image(ultrasound_dicoms["US1_J2KR.dcm"]), uncompressed)  # JPEG 2000, YBR_RCT

    palette = only_image(ultrasound_dicoms["OBXXXX1A.dcm"])
    assert palette.shape == (600, 800, 3)
    np.testing.assert_array_equal(only_image(ultrasound_dicoms["OBXXXX1A_rle.dcm"]), palette)
    np.testing.assert_array_equal(only_image(get_testdata_file("OBXXXX1A_expb.dcm")), palette)  # big endian
    two = frames(ultrasound_dicoms["OBXXXX1A_2frame.dcm"])
    assert [f.index for f in two] == [0, 1]
    np.testing.assert_array_equal(two[0].image, palette)


def independent_palette(path) -> np.ndarray:
    """Apply a palette by hand: little-endian 16-bit LUT entries, high byte kept."""
    ds = pydicom.dcmread(path)
    entries, first, bits = ds.RedPaletteColorLookupTableDescriptor
    assert bits == 16
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, (entries or 65536) - 1)
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2") for c in ("Red", "Green", "Blue")]
    return np.stack([(lut[index] >> 8).astype(np.uint8) for lut in luts], axis=-1)


def test_palette_colour_with_16_bit_lut_entries(ultrasound_dicoms):
    image = only_image(ultrasound_dicoms["OBXXXX1A.dcm"])
    np.testing.assert_array_equal(image, independent_palette(ultrasound_dicoms["OBXXXX1A.dcm"]))
    assert image.std() > 5  # not a blank frame


def test_segmented_16_bit_palette(ultrasound_dicoms):
    path = ultrasound_dicoms["gdcm-US-ALOKA-16.dcm"]  # 65536-entry segmented LUT, 16-bit stored values
    ds = pydicom.dcmread(path)
    image = only_image(path)
    np.testing.assert_array_equal(image, apply_color_lut(ds.pixel_array, ds) >> 8)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_ybr_cine_gives_120_rgb_frames_with_stride(ultrasound_dicoms):
    path = ultrasound_dicoms["color3d_jpeg_baseline.dcm"]
    every = frames(path)
    assert len(every) == 120
    assert all(f.image.shape == (480, 640, 3) for f in every)
    assert every[0].metadata["num_frames"] == 120
    assert every[0].metadata["photometric_interpretation"] == "YBR_FULL_422"
    strided = frames(path, frame_stride=7)
    assert [f.index for f in strided] == list(range(0, 120, 7))
    for frame in strided:
        np.testing.assert_array_equal(frame.image, every[frame.index].image)
    # Colour survives the YBR -> RGB conversion (a missed conversion gives green/purple casts).
    np.testing.assert_array_equal(every[5].image, pixel_array(path, index=5))


def test_jpeg_lossless_greyscale_copied_to_three_channels(ultrasound_dicoms):
    path = ultrasound_dicoms["JPGLosslessP14SV1_1s_1f_8b.dcm"]
    image = only_image(path)
    grey = pydicom.dcmread(path).pixel_array
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)


def write_grey_dicom(path: Path, pixels: np.ndarray, photometric: str, bits: int, **extra) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) % 256
    mono2 = only_image(write_grey_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", 8))
    mono1 = only_image(write_grey_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", 8))
    np.testing.assert_array_equal(mono2[..., 0], pixels)
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_12_bit_greyscale_is_windowed(tmp_path):
    pixels = np.linspace(0, 4095, 40 * 50).reshape(40, 50).round()
    center, width = 2000.0, 1001.0
    image = only_image(
        write_grey_dicom(tmp_path / "w.dcm", pixels, "MONOCHROME2", 12, WindowCenter=center, WindowWidth=width)
    )
    # DICOM PS3.3 C.11.2.1.2.1 linear window, written out independently.
    expected = np.clip((pixels - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert np.abs(image[..., 0].astype(float) - expected).max() <= 1.0
    assert image[..., 0].min() == 0 and image[..., 0].max() == 255


def test_dicom_without_suffix_is_found_by_preamble(tmp_path, ultrasound_dicoms):
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(ultrasound_dicoms["US1_UNCR.dcm"], folder / "IM0001")
    (folder / "notes.txt").write_text("not an image")
    (folder / "report").write_bytes(b"\0" * 200)
    assert expand_inputs([folder]) == [folder / "IM0001"]
    np.testing.assert_array_equal(only_image(folder / "IM0001"), only_image(ultrasound_dicoms["US1_UNCR.dcm"]))


# --- still images --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("RGB", ".png"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".jpg"), ("L", ".bmp"), ("RGB", ".tif")],
)
def test_8_bit_images_match_pil_convert_rgb(tmp_path, mode, suffix):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    source = rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)
    path = tmp_path / f"image{suffix}"
    source.save(path)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(only_image(path), expected)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_stretched_not_clipped(tmp_path, suffix):
    values = np.linspace(1000, 3000, 16 * 24).reshape(16, 24).astype(np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    image = only_image(path)
    expected = np.rint((values - 1000.0) * 255 / 2000)
    np.testing.assert_array_equal(image[..., 0], expected)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_load_image_returns_rgb_pil(ultrasound_dicoms):
    image = load_image(ultrasound_dicoms["OBXXXX1A_2frame.dcm"])
    assert image.mode == "RGB" and image.size == (800, 600)


# --- volumes and videos ------------------------------------------------------------------------


def test_nifti_mha_and_nrrd_give_identical_slices(tmp_path):
    import nibabel
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    zyx = rng.normal(size=(5, 12, 16)).astype(np.float32)  # (z, y, x)
    nibabel.save(nibabel.Nifti1Image(zyx.transpose(2, 1, 0), np.eye(4)), tmp_path / "v.nii.gz")
    for suffix in (".mha", ".nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(zyx), str(tmp_path / f"v{suffix}"))

    nifti = frames(tmp_path / "v.nii.gz")
    assert [f.index for f in nifti] == [0, 1, 2, 3, 4]
    expected = np.rint((zyx - zyx.min()) * 255 / (zyx.max() - zyx.min()))
    for frame in nifti:
        assert frame.image.shape == (12, 16, 3)
        np.testing.assert_array_equal(frame.image[..., 0], expected[frame.index])
    for suffix in (".mha", ".nrrd"):
        other = frames(tmp_path / f"v{suffix}")
        for a, b in zip(nifti, other, strict=True):
            np.testing.assert_array_equal(a.image, b.image)

    along_x = frames(tmp_path / "v.mha", axis=2, slice_stride=5)
    assert [f.index for f in along_x] == [0, 5, 10, 15]
    assert along_x[1].image.shape == (5, 12, 3)
    np.testing.assert_array_equal(along_x[1].image[..., 1], expected[:, :, 5])


def test_uint8_volume_keeps_values(tmp_path):
    import SimpleITK as sitk

    volume = np.arange(2 * 6 * 7, dtype=np.uint8).reshape(2, 6, 7)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "u8.mha"))
    np.testing.assert_array_equal(frames(tmp_path / "u8.mha")[1].image[..., 0], volume[1])


def test_video_frames_with_stride(tmp_path):
    import av

    path = tmp_path / "clip.avi"
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "bgr0"
        for colour in colours:
            array = np.empty((24, 32, 3), dtype=np.uint8)
            array[:] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    every = frames(path)
    assert len(every) == len(colours)
    for frame, colour in zip(every, colours, strict=True):
        np.testing.assert_array_equal(frame.image[0, 0], colour)  # ffv1 is lossless
    assert [f.index for f in frames(path, frame_stride=4)] == [0, 4]
    assert every[0].metadata["fps"] == 10


# --- bad input and input expansion --------------------------------------------------------------


@pytest.mark.parametrize("name", ["broken.png", "broken.dcm", "broken.nii.gz", "broken.mha", "broken.mp4", "x.txt"])
def test_corrupt_or_unsupported_files_raise_unreadable_with_path(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 if name.endswith(".png") else b"garbage" * 20)
    with pytest.raises(UnreadableImageError, match=str(path)):
        frames(path)


def test_missing_file_and_truncated_dicom(tmp_path, ultrasound_dicoms):
    with pytest.raises(UnreadableImageError, match="no such file"):
        frames(tmp_path / "absent.png")
    data = ultrasound_dicoms["US1_UNCR.dcm"].read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="cut.dcm"):
        frames(tmp_path / "cut.dcm")


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "v.nii").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(UnreadableImageError, match=r"usfmae-hf\[volumes\]"):
        frames(tmp_path / "v.nii")


def test_expand_inputs_folders_globs_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ["a/1.png", "a/deep/2.JPG", "a/deep/3.nii.gz", "a/.hidden.png", "a/skip.txt", "b.dcm"]:
        (tmp_path / name).write_bytes(b"x")
    expected = [tmp_path / "a/1.png", tmp_path / "a/deep/2.JPG", tmp_path / "a/deep/3.nii.gz"]
    assert expand_inputs([tmp_path / "a"]) == expected
    assert expand_inputs([str(tmp_path / "a" / "**" / "*.png")]) == [tmp_path / "a/1.png"]
    # explicit files are kept whatever they are (load_frames reports them); duplicates collapse
    assert expand_inputs([tmp_path / "b.dcm", tmp_path / "a/skip.txt", tmp_path / "a/1.png", tmp_path / "a"]) == sorted(
        [*expected, tmp_path / "b.dcm", tmp_path / "a/skip.txt"]
    )
    with pytest.raises(UsfmaeError, match="no such file"):
        expand_inputs([str(tmp_path / "nothing*.png")])
    assert {".dcm", ".nii.gz", ".mha", ".mhd", ".nrrd", ".avi", ".mp4", ".png", ".jpg", ".tif"} <= SUPPORTED_SUFFIXES
