"""The quickstart's labelled task (probe orientation: upright vs flipped fan), split by scan, never by frame.

The task is built from the ingest build, not from the raw files: the build already holds each frame
content once (the ingest drops exact duplicates by pixel SHA-256 and near duplicates by perceptual
hash). A *scan* is one source file merged with every file that the ingest found sharing a frame's
content with it (``ingest_report.json``: ``US1_UNCR.dcm`` and its JPEG 2000 copy ``US1_J2KR.dcm`` are
one scan, and so are ``OBXXXX1A.dcm`` and its two-frame and RLE variants); all frames of a cine
belong to its scan. Whole scans go to train or validation, so no content and no neighbouring cine
frame is on both sides; :func:`check_task_leakage` proves the first with
:func:`usfmae_hf.evaluation.check_leakage`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import UsfmaeError

if TYPE_CHECKING:
    from usfmae_hf.evaluation import LeakageReport

SPLITS = ("train", "validation")
LABELS = ("upright", "flipped")
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("file", "split", "label", "scan", "source", "frame", "source_sha256")


@dataclass
class OrientationTask:
    """What :func:`build_orientation_task` wrote.

    Attributes:
        counts: split -> label -> images.
        scans: scan (its first source path) -> ``{"files": file names, "frames": frames kept by the ingest,
            "split": split}``.
    """

    counts: dict[str, dict[str, int]]
    scans: dict[str, dict] = field(default_factory=dict)


def _scans_of_build(build_dir: Path, paths: list[str]) -> dict[str, str]:
    """Source path -> scan (named by its first path): files linked by an exact or near duplicate in the ingest
    report are one scan."""
    report_file = build_dir / "ingest_report.json"
    if not report_file.is_file():
        raise UsfmaeError(f"{build_dir}: no ingest_report.json (build the dataset with 'usfmae ingest' first)")
    parent = {path: path for path in paths}

    def root(path: str) -> str:
        while parent.setdefault(path, path) != path:
            parent[path] = parent[parent[path]]
            path = parent[path]
        return path

    for dataset in json.loads(report_file.read_text())["datasets"]:
        for duplicate in dataset["duplicates"]:
            first, second = sorted((root(duplicate["path"]), root(duplicate["duplicate_of"]["path"])))
            parent[second] = first  # the smallest path names the scan
    return {path: root(path) for path in parent}


def _assign_splits(rows_per_scan: dict[str, int], validation_share: float) -> dict[str, str]:
    """Largest scan first, each to the split furthest below its share of all rows (ties go to train)."""
    total = sum(rows_per_scan.values())
    targets = {"train": (1 - validation_share) * total, "validation": validation_share * total}
    filled = dict.fromkeys(SPLITS, 0)
    assignment = {}
    for scan in sorted(rows_per_scan, key=lambda name: (-rows_per_scan[name], name)):
        split = max(SPLITS, key=lambda name: targets[name] - filled[name])
        assignment[scan] = split
        filled[split] += rows_per_scan[scan]
    return assignment


def build_orientation_task(
    build_dir: str | Path, task_dir: str | Path, *, validation_share: float = 1 / 3
) -> OrientationTask:
    """Write an image-folder task from an ingest build: every kept frame upright and flipped, split by scan.

    ``task_dir/{train,validation}/{upright,flipped}/*.png`` plus ``task_dir/manifest.csv`` (one row per
    image: its split, label, scan, source file, frame and the source frame's pixel SHA-256). Both
    orientations of a frame, and all frames of a scan, share a split; about ``validation_share`` of the
    frames go to validation.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    build_dir, task_dir = Path(build_dir), Path(task_dir)
    shards = sorted((build_dir / "data").glob("*.parquet"))
    if not shards:
        raise UsfmaeError(f"{build_dir}: no Parquet shards under data/ (build the dataset with 'usfmae ingest' first)")
    rows = [
        row
        for shard in shards
        for row in pq.read_table(shard, columns=["image", "path", "frame", "sha256"]).to_pylist()
    ]
    scan_of = _scans_of_build(build_dir, [row["path"] for row in rows])
    frames_per_scan = Counter(scan_of[row["path"]] for row in rows)
    split_of = _assign_splits(frames_per_scan, validation_share)
    if set(split_of.values()) != set(SPLITS):
        raise UsfmaeError(
            f"{build_dir}: {len(split_of)} distinct scans cannot fill both a train and a validation split"
        )

    task = OrientationTask({split: dict.fromkeys(LABELS, 0) for split in SPLITS})
    for path, scan in sorted(scan_of.items()):
        entry = task.scans.setdefault(
            scan, {"files": [], "frames": frames_per_scan.get(scan, 0), "split": split_of.get(scan)}
        )
        entry["files"].append(Path(path).name)
    manifest = []
    for row in rows:
        scan = scan_of[row["path"]]
        split = split_of[scan]
        upright = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        flipped = upright.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        for label, image in zip(LABELS, (upright, flipped)):
            name = Path(row["path"]).with_suffix("").as_posix().replace("/", "__")
            target = task_dir / split / label / f"{name}_{row['frame']:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            task.counts[split][label] += 1
            manifest.append(
                {
                    "file": target.relative_to(task_dir).as_posix(),
                    "split": split,
                    "label": label,
                    "scan": scan,
                    "source": row["path"],
                    "frame": row["frame"],
                    "source_sha256": row["sha256"],
                }
            )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    writer.writerows(manifest)
    atomic_write_text(task_dir / MANIFEST, text.getvalue())
    return task


def check_task_leakage(task_dir: str | Path) -> LeakageReport:
    """:func:`usfmae_hf.evaluation.check_leakage` on a task written by :func:`build_orientation_task`.

    Checks that no scan and no image content (pixel SHA-256 of the decoded image) is in both splits.

    Raises:
        DataLeakageError: a scan or an image is shared by the splits.
    """
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    from usfmae_hf.evaluation import check_leakage

    task_dir = Path(task_dir)
    with open(task_dir / MANIFEST, newline="") as handle:
        manifest = list(csv.DictReader(handle))
    splits = {}
    for split in SPLITS:
        rows = [row for row in manifest if row["split"] == split]
        columns = {
            "image": [str(task_dir / row["file"]) for row in rows],
            "id": [row["file"] for row in rows],
            "scan": [row["scan"] for row in rows],
        }
        splits[split] = Dataset.from_dict(columns).cast_column("image", ImageFeature())
    return check_leakage(DatasetDict(splits), group_column="scan")
