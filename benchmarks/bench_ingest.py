"""Ingest throughput, and what pre-resized storage saves at training time.

1. ``usfmae ingest`` files/s in one process for typical ultrasound PNG exports (8-bit grey, 800x600,
   speckle inside a sector on black, like HC18/BUS-BRA exports) and for the real ultrasound DICOMs
   of pydicom-data (GE RGB, Philips palette, JPEG lossless/2000, a 120-frame cine at stride 10).
2. Training-time decode + USF-MAE augmentation (``usfmae_hf.image.augment.build_train_transform("usfmae")``:
   RGB, Resize 224 NEAREST, RandomRotation, flips, RandomResizedCrop(0.5-2.0), normalise) per second in
   one thread, from the build's stored 224x224 PNGs vs from the original PNG files; once with the
   whole transform on the CPU, once with only the DataLoader-worker stage of
   ``build_split_train_transform`` (decode, RGB, resize; the random ops run batched on the accelerator).
   Target: stored is >= 3x faster.

Both sides of each ratio are measured in this run (machines are noisy; compare ratios only).
Usage: ``python benchmarks/bench_ingest.py [--images 60] [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usfmae_hf.image.augment import build_split_train_transform, build_train_transform
from usfmae_hf.ingest import IngestOptions, ingest

DICOMS = ("US1_UNCR.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm")


def ultrasound_like(seed: int, height: int = 600, width: int = 800) -> np.ndarray:
    """Speckle (Rayleigh, lightly smoothed) inside a sector, black outside: compresses like a real export."""
    rng = np.random.default_rng(seed)
    speckle = rng.rayleigh(40.0, (height, width))
    speckle = (speckle + np.roll(speckle, 1, 0) + np.roll(speckle, 1, 1)) / 3
    y, x = np.mgrid[0:height, 0:width]
    angle = np.arctan2(x - width / 2, y + 40)
    radius = np.hypot(x - width / 2, y + 40)
    sector = (np.abs(angle) < 0.6) & (radius < height * 0.95)
    return np.where(sector, np.clip(speckle, 0, 255), 0).astype(np.uint8)


def files_per_second(root: Path, output: Path, options: IngestOptions) -> tuple[float, int]:
    files = sum(1 for p in root.rglob("*") if p.is_file())
    start = time.perf_counter()
    report = ingest(root, output, options=options, num_proc=1, progress=False)
    return files / (time.perf_counter() - start), report["rows"]


def throughput(samples: list, decode, transform, seconds: float) -> float:
    """Decoded + augmented images per second, cycling over ``samples`` for about ``seconds``."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        transform(decode(samples[count % len(samples)]))
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60, help="synthetic PNG exports to ingest (default 60)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per decode+augment measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        png_root = work / "png" / "HC18" / "training_set"
        png_root.mkdir(parents=True)
        originals = []
        for i in range(args.images):
            path = png_root / f"{i:03d}_HC.png"
            Image.fromarray(ultrasound_like(i)).save(path)
            originals.append(path)
        png_rate, png_rows = files_per_second(work / "png", work / "png_build", IngestOptions(near_dup_threshold=None))
        print(f"ingest PNG 800x600 grey: {png_rate:.1f} files/s per process ({png_rows} rows)")

        from pydicom.data import get_testdata_file

        dicom_root = work / "dicom" / "clinic"
        dicom_root.mkdir(parents=True)
        for name in DICOMS:
            shutil.copy(get_testdata_file(name), dicom_root / name)
        shutil.copy(get_testdata_file("color3d_jpeg_baseline.dcm"), dicom_root / "cine.dcm")
        options = IngestOptions(frame_stride=10, near_dup_threshold=None)
        dicom_rate, dicom_rows = files_per_second(work / "dicom", work / "dicom_build", options)
        print(
            f"ingest DICOM (pydicom-data, {len(DICOMS) + 1} files): {dicom_rate:.2f} files/s per process "
            f"({dicom_rows} rows)"
        )

        import pyarrow.parquet as pq

        stored = [
            row["bytes"]
            for shard in sorted((work / "png_build" / "data").glob("*.parquet"))
            for row in pq.read_table(shard, columns=["image"]).column("image").to_pylist()
        ]
        open_stored = lambda data: Image.open(io.BytesIO(data))  # noqa: E731
        worker_stage, _ = build_split_train_transform("usfmae", 224)
        for label, transform in (
            ("full USF-MAE train transform on CPU", build_train_transform("usfmae", 224)),
            ("worker stage only (RGB + Resize 224; random ops on the accelerator)", worker_stage),
        ):
            from_originals = throughput(originals, Image.open, transform, args.seconds)
            from_stored = throughput(stored, open_stored, transform, args.seconds)
            ratio = from_stored / from_originals
            print(f"decode + {label}, 1 thread:")
            print(
                f"  from original PNGs {from_originals:.1f} img/s, from stored 224x224 {from_stored:.1f} img/s: "
                f"{ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
