"""Leakage checks: no patient and no image may sit in two splits, or in a pretraining build and a test set.

Images are compared by :func:`usfmae_hf.io.hashing.pixel_sha256` of their decoded RGB pixels, the
same hash the ``sha256`` column of an ingest build holds, so a build can be checked against a raw
dataset folder or another build without decoding the build.
"""

from __future__ import annotations

import io
import itertools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.io.hashing import image_sha256, pixel_sha256

__all__ = ["DataLeakageError", "LeakageReport", "check_leakage", "find_shared_images", "hash_images"]


class DataLeakageError(UsfmaeError):
    """A patient/group or an identical image appears in two splits."""


@dataclass
class LeakageReport:
    """What :func:`check_leakage` found.

    Attributes:
        split_sizes: rows per split.
        shared_groups: ``"a/b"`` -> groups present in both splits ``a`` and ``b`` (empty when clean).
        shared_images: ``"a/b"`` -> ``(id in a, id in b)`` pairs of identical images (empty when clean).
    """

    split_sizes: dict[str, int]
    group_column: str | None
    shared_groups: dict[str, list[str]] = field(default_factory=dict)
    shared_images: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether no group and no image is shared by two splits."""
        return not self.shared_groups and not self.shared_images

    def __str__(self) -> str:
        sizes = ", ".join(f"{name} {size}" for name, size in self.split_sizes.items())
        if self.ok:
            checked = f"groups ({self.group_column}) and " if self.group_column else ""
            return f"no {checked}image content shared between splits ({sizes})"
        problems = [
            f"{pair}: {len(groups)} shared groups, e.g. {groups[:3]}" for pair, groups in self.shared_groups.items()
        ]
        problems += [
            f"{pair}: {len(pairs)} identical images, e.g. {pairs[:3]}" for pair, pairs in self.shared_images.items()
        ]
        return f"leakage between splits ({sizes}): " + "; ".join(problems)


def _split_hashes(dataset, image_column: str) -> list[str]:
    from datasets import Image as ImageFeature

    hashes = []
    for item in dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]:
        source = io.BytesIO(item["bytes"]) if item["bytes"] is not None else item["path"]
        with Image.open(source) as image:
            hashes.append(image_sha256(image))
    return hashes


def check_leakage(
    dataset_dict,
    group_column: str | None = None,
    *,
    image_column: str = "image",
    id_column: str = "id",
    raise_on_leak: bool = True,
) -> LeakageReport:
    """Prove that no group and no image content appears in two splits of ``dataset_dict``.

    Args:
        dataset_dict: a ``datasets.DatasetDict`` (or mapping of split name -> ``Dataset``).
        group_column: column holding the patient/group id; ``None`` checks image content only.
        image_column: the ``Image`` column, hashed by decoded pixels.
        id_column: column naming rows in the report (row index when missing).
        raise_on_leak: raise :class:`DataLeakageError` rather than return a failing report.
    """
    report = LeakageReport({name: len(split) for name, split in dataset_dict.items()}, group_column)
    groups, hashes = {}, {}
    for name, split in dataset_dict.items():
        if group_column is not None:
            groups[name] = set(split[group_column])
        ids = split[id_column] if id_column in split.column_names else [str(i) for i in range(len(split))]
        hashes[name] = dict(zip(_split_hashes(split, image_column), ids))
    for first, second in itertools.combinations(dataset_dict, 2):
        pair = f"{first}/{second}"
        if group_column is not None and (shared := sorted(map(str, groups[first] & groups[second]))):
            report.shared_groups[pair] = shared
        if same := sorted((hashes[first][h], hashes[second][h]) for h in hashes[first].keys() & hashes[second].keys()):
            report.shared_images[pair] = same
    if raise_on_leak and not report.ok:
        raise DataLeakageError(str(report))
    return report


def hash_images(directory: str | os.PathLike, *, progress: bool = True) -> dict[str, list[str]]:
    """Pixel SHA-256 -> locations (``path#frame``) of every image in ``directory``.

    An ingest build (Parquet files with a ``sha256`` column) is read without decoding; any other folder
    has every supported file decoded through :func:`usfmae_hf.io.load_frames` (all frames and slices),
    skipping unreadable files.
    """
    import pyarrow.parquet as pq

    from usfmae_hf.io import expand_inputs, load_frames

    directory = Path(directory)
    if not directory.is_dir():
        raise UsfmaeError(f"{directory}: not a folder")
    table: dict[str, list[str]] = defaultdict(list)
    shards = [
        p
        for p in directory.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    if shards and all("sha256" in pq.read_schema(p).names for p in shards):
        for shard in shards:
            columns = pq.read_table(shard, columns=["sha256", "path", "frame"]).to_pydict()
            for sha, path, frame in zip(columns["sha256"], columns["path"], columns["frame"]):
                table[sha].append(f"{path}#{frame}")
        return dict(table)
    for path in tqdm(expand_inputs([directory]), desc=f"hash {directory.name}", unit="file", disable=not progress):
        relative = path.relative_to(directory).as_posix()
        try:
            for frame in load_frames(path):
                table[pixel_sha256(frame.image)].append(f"{relative}#{frame.index}")
        except UnreadableImageError:
            continue
    return dict(table)


def find_shared_images(
    build: str | os.PathLike, against: list[str | os.PathLike], *, progress: bool = True
) -> dict[str, list[tuple[list[str], list[str]]]]:
    """For each folder of ``against``: the images it shares with ``build``, as (build locations, its locations)."""
    mine = hash_images(build, progress=progress)
    shared = {}
    for other in against:
        theirs = hash_images(other, progress=progress)
        shared[str(other)] = [(mine[sha], theirs[sha]) for sha in sorted(mine.keys() & theirs.keys())]
    return shared
