"""The readers' size guard: decoded sizes from headers, refused before decoding; MemoryError as a skip."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, UltrasoundImageStorage, generate_uid

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io import load_frames
from usfmae_hf.io.limits import DecodedSizeError, memory_errors_as_unreadable


def write_rle_dicom(path: Path, pixels: np.ndarray, *, claim: tuple[int, int] | None = None) -> Path:
    """An RLE Lossless 8-bit grey DICOM of ``pixels``; ``claim`` sets Rows/Columns after compressing (lying)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = UltrasoundImageStorage
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    if claim is not None:
        ds.Rows, ds.Columns = claim
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def vm_hwm_script(body: str) -> str:
    """Python source that runs ``body`` and prints a JSON line with its result and this process's peak RSS."""
    return textwrap.dedent(
        """
        import json, time
        start = time.perf_counter()
        result = None
        {body}
        elapsed = time.perf_counter() - start
        hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({{"result": result, "seconds": elapsed, "vm_hwm_kib": hwm}}))
        """
    ).format(body=textwrap.dedent(body).strip())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_lying_rle_dicom_is_refused_quickly_in_bounded_memory(tmp_path):
    """A ~40 KB RLE file claiming 65535 x 65535 pixels would make pydicom allocate 4 GiB; the guard refuses it first."""
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    path = write_rle_dicom(tmp_path / "lying.dcm", pixels, claim=(65535, 65535))
    assert path.stat().st_size < 100_000
    body = f"""
    from usfmae_hf.errors import UnreadableImageError
    from usfmae_hf.io import load_frames
    try:
        list(load_frames({str(path)!r}))
    except UnreadableImageError as error:
        result = [type(error).__name__, str(error)]
    """
    # VmHWM of a fresh interpreter: ru_maxrss would report the (larger) peak of this pytest process.
    run = subprocess.run([sys.executable, "-c", vm_hwm_script(body)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    kind, message = report["result"]
    assert kind == "DecodedSizeError" and "\n" not in message
    assert "over the limit" in message and str(path) in message and "4,096 MiB" in message
    assert report["vm_hwm_kib"] < 500 * 1024, report
    assert report["seconds"] < 10, report


def test_lying_rle_dicom_refused_by_every_caller_that_skips_unreadable(tmp_path):
    path = write_rle_dicom(tmp_path / "lying.dcm", np.zeros((32, 32), np.uint8), claim=(65535, 65535))
    with pytest.raises(UnreadableImageError, match="over the limit"):
        list(load_frames(path))


@pytest.mark.parametrize(
    "name", ["US1_UNCR.dcm", "OBXXXX1A_rle.dcm", "color3d_jpeg_baseline.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"]
)
def test_dicom_limit_is_the_decoded_size_of_all_frames(ultrasound_dicoms, name):
    """The limit compares with what pydicom decodes for the whole file (pixel_array), to the byte."""
    if name not in ultrasound_dicoms:
        pytest.skip(f"{name} missing from pydicom-data")
    path = ultrasound_dicoms[name]
    decoded = pixel_array(path, as_rgb=False).nbytes
    assert len(list(load_frames(path, max_decoded_bytes=decoded, frame_stride=60))) >= 1
    with pytest.raises(DecodedSizeError) as refused:
        next(iter(load_frames(path, max_decoded_bytes=decoded - 1)))
    assert refused.value.decoded_bytes == decoded


def write_volumes(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """NIfTI (plain and scaled), MHA (RGB vectors) and NRRD volumes, with the bytes of the array each reader builds."""
    import nibabel as nib
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    volumes = {}
    grey = rng.integers(0, 4000, (6, 7, 5), dtype=np.int16)
    nib.save(nib.Nifti1Image(grey, np.eye(4)), tmp_path / "plain.nii.gz")
    volumes["plain"] = (tmp_path / "plain.nii.gz", grey.nbytes)
    scaled = nib.Nifti1Image(grey, np.eye(4))
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, tmp_path / "scaled.nii")
    # nibabel applies the scaling into floats: its own array is the reference
    volumes["scaled"] = (tmp_path / "scaled.nii", np.asarray(nib.load(tmp_path / "scaled.nii").get_fdata()).nbytes)
    rgb = rng.integers(0, 256, (4, 9, 8, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.mha"))
    volumes["rgb"] = (tmp_path / "rgb.mha", rgb.nbytes)
    floats = rng.normal(size=(3, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(floats), str(tmp_path / "floats.nrrd"))
    volumes["floats"] = (tmp_path / "floats.nrrd", floats.nbytes)
    return volumes


def test_volume_limit_is_the_array_size_from_the_header(tmp_path):
    for name, (path, decoded) in write_volumes(tmp_path).items():
        assert len(list(load_frames(path, max_decoded_bytes=decoded))) >= 1, name
        with pytest.raises(DecodedSizeError) as refused:
            next(iter(load_frames(path, max_decoded_bytes=decoded - 1)))
        assert refused.value.decoded_bytes == decoded, name


def test_lying_mha_header_is_refused_unread(tmp_path):
    path = tmp_path / "lying.mha"
    header = "ObjectType = Image\nNDims = 3\nDimSize = 50000 50000 50000\nElementType = MET_USHORT\n"
    header += "ElementDataFile = LOCAL\n"
    path.write_bytes(header.encode() + b"\0" * 64)
    with pytest.raises(DecodedSizeError, match="over the limit") as refused:
        list(load_frames(path))
    assert refused.value.decoded_bytes == 50000**3 * 2


@pytest.mark.parametrize(("suffix", "codec", "pix_fmt"), [(".avi", "ffv1", "yuv444p"), (".mp4", "mpeg4", "yuv420p")])
def test_video_limit_is_width_height_3_times_frames(tmp_path, suffix, codec, pix_fmt):
    import av

    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width, stream.pix_fmt = 16, 24, pix_fmt
        for k in range(7):
            frame = np.full((16, 24, 3), 30 * k, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # what PyAV decodes, independently of the reader
        decoded = sum(frame.to_ndarray(format="rgb24").nbytes for frame in container.decode(video=0))
    assert decoded == 7 * 16 * 24 * 3
    assert len(list(load_frames(path, max_decoded_bytes=decoded))) == 7
    with pytest.raises(DecodedSizeError):
        next(iter(load_frames(path, max_decoded_bytes=decoded - 1)))


def test_environment_variable_sets_the_default_and_the_keyword_wins(tmp_path, monkeypatch):
    path = write_rle_dicom(tmp_path / "small.dcm", np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    monkeypatch.setenv("USFMAE_MAX_DECODED_MB", "0.001")  # 1048 bytes < 4096
    with pytest.raises(DecodedSizeError, match="take 4,096 bytes, over the limit of 1,048 bytes"):
        list(load_frames(path))
    assert len(list(load_frames(path, max_decoded_bytes=4096))) == 1
    monkeypatch.setenv("USFMAE_MAX_DECODED_MB", "1")
    (frame,) = load_frames(path)
    np.testing.assert_array_equal(frame.image[..., 0], np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    for bad in ("lots", "-5", "0", "nan"):
        monkeypatch.setenv("USFMAE_MAX_DECODED_MB", bad)
        with pytest.raises(UsfmaeError, match="USFMAE_MAX_DECODED_MB") as error:
            load_frames(path)
        assert not isinstance(error.value, UnreadableImageError)  # a setting to fix, not a file to skip


def write_lying_nifti(path: Path, shape: tuple[int, ...]) -> Path:
    """A tiny .nii.gz whose header claims a float64 array of ``shape``."""
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float64), np.eye(4))
    header = image.header.copy()
    header.set_data_shape(shape)
    buffer = io.BytesIO()
    header.write_to(buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data + b"\0" * (352 - len(data)) + np.zeros(8).tobytes()))
    return path


def test_memory_error_while_decoding_becomes_unreadable(tmp_path):
    """nibabel cannot allocate 20000**4 float64 (1.3e18 bytes, beyond any address space) once the guard allows it."""
    path = write_lying_nifti(tmp_path / "lying.nii.gz", (20000, 20000, 20000, 20000))
    with pytest.raises(DecodedSizeError):
        list(load_frames(path))
    with pytest.raises(UnreadableImageError, match="out of memory while decoding") as error:
        list(load_frames(path, max_decoded_bytes=2**62))
    assert not isinstance(error.value, DecodedSizeError)


def test_numpy_array_memory_error_becomes_unreadable(tmp_path):
    def frames():
        yield np.empty(2**62, dtype=np.uint8)  # numpy's _ArrayMemoryError, a MemoryError subclass

    with pytest.raises(UnreadableImageError, match=r"x\.dcm: out of memory while decoding \(Unable to allocate"):
        list(memory_errors_as_unreadable(tmp_path / "x.dcm", frames()))


def test_large_native_pixel_data_read_after_the_guard_decodes_as_pydicom(tmp_path):
    """Native pixel data over 1 MiB are read lazily (after the size check); frames still match pydicom's."""
    from pydicom.uid import UltrasoundMultiFrameImageStorage

    pixels = np.random.default_rng(3).integers(0, 4096, (4, 300, 500), dtype=np.uint16)  # 1.2 MB
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    (ds.NumberOfFrames, ds.Rows, ds.Columns), ds.SamplesPerPixel = pixels.shape, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "native.dcm"
    ds.save_as(path, enforce_file_format=True)
    frames = list(load_frames(path, max_decoded_bytes=pixels.nbytes))
    assert len(frames) == 4
    for frame, expected in zip(frames, pixel_array(path)):
        low, high = float(expected.min()), float(expected.max())
        grey = np.rint((expected - low) * (255.0 / (high - low))).astype(np.uint8)
        np.testing.assert_array_equal(frame.image, np.repeat(grey[..., None], 3, axis=-1))
    with pytest.raises(DecodedSizeError):
        list(load_frames(path, max_decoded_bytes=pixels.nbytes - 1))
