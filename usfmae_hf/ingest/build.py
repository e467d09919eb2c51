"""Turn unpacked OpenUS-46 folders into one de-duplicated Hugging Face dataset of Parquet shards.

``ROOT`` holds one folder per dataset, named as in the catalogue (compared case- and
punctuation-insensitively, aliases allowed); folders outside the catalogue are ingested with the
generic rules and reported as unknown. Each dataset's image files (after the catalogue's rules) are
cut into chunks of :data:`FILES_PER_SHARD` files; a chunk is decoded by a worker process through
:func:`usfmae_hf.io.load_frames` (volumes become slices, cines and videos frames) and becomes one
shard ``data/train-<folder>-<NNNNN>.parquet`` plus one manifest record ``.manifest/chunks/<key>.json``
written after it. A rerun skips every chunk whose files (names, sizes, modification times) did not
change, so an interrupted or extended build only decodes what is new.

De-duplication runs in the main process in chunk order, so that it is deterministic whatever the
number of workers: a frame is dropped when its pixel SHA-256 (:func:`usfmae_hf.io.hashing.pixel_sha256`
of the decoded, full-size frame) was already kept (exact duplicate), or when its 64-bit perceptual
hash (``imagehash.phash`` of the full-size frame) is within ``near_dup_threshold`` bits of a kept one
(near duplicate). Rows already in the build take precedence over new ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.ingest.catalogue import DatasetEntry, find_entry, generic_entry, normalize_name
from usfmae_hf.io import SUPPORTED_SUFFIXES, Frame, file_suffix, is_dicom_file, load_frames
from usfmae_hf.io.hashing import pixel_sha256

__all__ = [
    "FILES_PER_SHARD",
    "IngestOptions",
    "NearDuplicateIndex",
    "discover_sources",
    "ingest",
    "ingest_features",
    "push_build_to_hub",
]

#: Source files per chunk (one worker task, one shard, one manifest record).
FILES_PER_SHARD = 256
HDF5_SUFFIXES = frozenset({".h5", ".hdf5"})
_ROWS_PER_BATCH = 64
_PNG_COMPRESS_LEVEL = 3
_MANIFEST = ".manifest"
_REPORT_EXAMPLES = 5


def ingest_features():
    """The ``datasets.Features`` of a build: image, dataset, path, frame, group, sha256."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "dataset": datasets.Value("string"),
            "path": datasets.Value("string"),
            "frame": datasets.Value("int32"),
            "group": datasets.Value("string"),
            "sha256": datasets.Value("string"),
        }
    )


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


@dataclass(frozen=True)
class SourceFile:
    """One candidate image file: absolute path, POSIX path relative to ROOT, and patient/group id."""

    path: Path
    relative: str
    group: str | None


@dataclass
class DatasetSource:
    """A dataset folder under ROOT, the entry that ingests it, and what its rules kept and dropped."""

    folder: Path
    entry: DatasetEntry
    known: bool
    files: list[SourceFile] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    excluded_examples: dict[str, list[str]] = field(default_factory=dict)
    other_files: Counter = field(default_factory=Counter)

    @property
    def slug(self) -> str:
        """File-name-safe form of the folder name (used for shard and manifest names)."""
        return re.sub(r"[^a-z0-9]+", "-", self.folder.name.lower()).strip("-") or "dataset"

    def summary(self) -> dict[str, Any]:
        """What the layout rules did to this folder, for the ingest report."""
        return {
            "dataset": self.entry.name,
            "folder": self.folder.name,
            "in_catalogue": self.known,
            "layout_rules": "dataset-specific" if self.entry.has_layout_rules else "generic",
            "files": len(self.files),
            "excluded_by_rules": dict(self.excluded),
            "excluded_examples": self.excluded_examples,
            "other_files": dict(self.other_files),
        }


@dataclass(frozen=True)
class Chunk:
    """A worker task: up to :data:`FILES_PER_SHARD` files of one dataset folder."""

    key: str
    dataset: str
    folder: str
    files: tuple[SourceFile, ...]
    fingerprint: str


def _is_candidate(path: Path, entry: DatasetEntry) -> bool:
    suffix = file_suffix(path)
    if suffix in SUPPORTED_SUFFIXES:
        return True
    if suffix in HDF5_SUFFIXES:
        return "HDF5" in entry.formats
    return suffix == "" and is_dicom_file(path)


def _scan_folder(source: DatasetSource, root: Path) -> None:
    """Fill ``source`` with the image files its entry's rules keep, counting what they drop and why."""
    for directory, subdirs, names in os.walk(source.folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(directory, name)
            if not _is_candidate(path, source.entry):
                source.other_files[file_suffix(path) or "(none)"] += 1
                continue
            in_dataset = path.relative_to(source.folder).as_posix()
            reason = source.entry.exclusion_reason(in_dataset)
            if reason is not None:
                source.excluded[reason] += 1
                examples = source.excluded_examples.setdefault(reason, [])
                if len(examples) < _REPORT_EXAMPLES:
                    examples.append(in_dataset)
                continue
            source.files.append(SourceFile(path, path.relative_to(root).as_posix(), source.entry.group_of(in_dataset)))


def discover_sources(
    root: str | os.PathLike, *, datasets: Sequence[str] | None = None, include_heldout: bool = False
) -> tuple[list[DatasetSource], list[dict[str, str]]]:
    """Match the folders of ``root`` to the catalogue and list the image files of each.

    Args:
        root: folder holding one sub-folder per dataset.
        datasets: ingest only these (catalogue names, aliases or folder names); all when ``None``.
        include_heldout: also ingest the evaluation datasets (BUS-BRA, MMOTU-2D, GIST514-DB).

    Returns:
        The sources to ingest, and the folders skipped with the reason (``{"folder", "reason"}``).

    Raises:
        UsfmaeError: ``root`` is not a folder, or a requested dataset has no folder under it.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root}: not a folder")
    wanted = {normalize_name(name): name for name in datasets or ()}
    found: set[str] = set()
    sources, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = find_entry(folder.name)
        keys = {normalize_name(folder.name)} | (
            {normalize_name(n) for n in (entry.name, *entry.aliases)} if entry else set()
        )
        if wanted and not keys & wanted.keys():
            skipped.append({"folder": folder.name, "reason": "not selected (--datasets)"})
            continue
        found |= keys & wanted.keys()
        if entry is not None and entry.held_out and not include_heldout:
            skipped.append(
                {"folder": folder.name, "reason": f"{entry.name} is held out for evaluation (--include-heldout)"}
            )
            continue
        source = DatasetSource(folder, entry or generic_entry(folder.name), known=entry is not None)
        _scan_folder(source, root)
        sources.append(source)
    missing = [name for key, name in wanted.items() if key not in found]
    if missing:
        raise UsfmaeError(f"no folder under {root} for: {', '.join(missing)}")
    return sources, skipped


def _chunks(source: DatasetSource, files_per_shard: int) -> Iterator[Chunk]:
    rules = repr(dataclasses.astuple(source.entry))
    for index, start in enumerate(range(0, len(source.files), files_per_shard)):
        files = tuple(source.files[start : start + files_per_shard])
        digest = hashlib.sha256(rules.encode())
        for file in files:
            stat = file.path.stat()
            digest.update(f"{file.relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        yield Chunk(f"{source.slug}-{index:05d}", source.entry.name, source.folder.name, files, digest.hexdigest())


class NearDuplicateIndex:
    """Greedy near-duplicate filter over 64-bit perceptual hashes.

    The 64 bits are cut into ``threshold + 1`` bands: two hashes within ``threshold`` bits of each other
    agree exactly on at least one band (pigeonhole), so a lookup compares a hash only with the kept
    hashes sharing a band value instead of with all of them, and still finds every match.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        bands = threshold + 1
        self._bands = [(64 * i // bands, 64 * (i + 1) // bands) for i in range(bands)]
        self._tables: list[dict[int, list[tuple[int, Any]]]] = [{} for _ in self._bands]

    def _keys(self, value: int) -> Iterator[int]:
        for start, stop in self._bands:
            yield (value >> start) & ((1 << (stop - start)) - 1)

    def find(self, value: int) -> tuple[Any, int] | None:
        """The reference and distance of a kept hash within the threshold of ``value``, or ``None``."""
        for table, key in zip(self._tables, self._keys(value)):
            for other, reference in table.get(key, ()):
                distance = (value ^ other).bit_count()
                if distance <= self.threshold:
                    return reference, distance
        return None

    def add(self, value: int, reference: Any) -> None:
        """Keep ``value`` (with a reference reported for its future duplicates)."""
        for table, key in zip(self._tables, self._keys(value)):
            table.setdefault(key, []).append((value, reference))


def _read_hdf5_frames(path: Path, frame_stride: int) -> Iterator[Frame]:
    """Frames of the Thyroid US Cineclip HDF5 file (``image`` stack, ``annot_id`` per frame as group)."""
    try:
        import h5py
    except ImportError:
        raise UnreadableImageError(f"{path}: HDF5 is not supported without h5py (pip install h5py)") from None
    from usfmae_hf.io.pixels import to_rgb_uint8

    with h5py.File(path, "r") as handle:
        images = handle["image"]
        annot_ids = handle["annot_id"] if "annot_id" in handle else None
        for index in range(0, len(images), frame_stride):
            metadata: dict[str, Any] = {"format": "HDF5"}
            if annot_ids is not None:
                value = annot_ids[index]
                metadata["group"] = value.decode() if isinstance(value, bytes) else str(value)
            yield Frame(to_rgb_uint8(np.asarray(images[index])), index, metadata)


def _frames(file: SourceFile, options: IngestOptions) -> Iterator[Frame]:
    if file_suffix(file.path) in HDF5_SUFFIXES:
        return _read_hdf5_frames(file.path, options.frame_stride)
    return load_frames(file.path, frame_stride=options.frame_stride, slice_stride=options.slice_stride)


def _encode(rgb: np.ndarray, resize: int | None) -> bytes:
    """PNG bytes of the frame as stored: optionally resized NEAREST, 8-bit grey when the channels agree."""
    image = Image.fromarray(rgb, mode="RGB")
    if resize is not None:
        image = image.resize((resize, resize), Image.Resampling.NEAREST)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        image = image.convert("L")  # lossless here, and a third of the bytes to decode at training time
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _decode_chunk(chunk: Chunk, options: IngestOptions, staged: Path) -> dict[str, Any]:
    """Worker: decode every file of ``chunk`` into ``staged`` (Parquet); return hashes and failures."""
    import imagehash
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = ingest_features().arrow_schema
    hashes: list[list] = []
    errors: list[dict[str, str]] = []
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(staged, schema) as writer:
        for file in chunk.files:
            rows, row_hashes = [], []
            try:
                for frame in _frames(file, options):
                    sha = pixel_sha256(frame.image)
                    phash = str(imagehash.phash(Image.fromarray(frame.image, mode="RGB")))
                    group = frame.metadata.get("group", file.group)
                    rows.append(
                        {
                            "image": {"bytes": _encode(frame.image, options.resize), "path": None},
                            "dataset": chunk.dataset,
                            "path": file.relative,
                            "frame": frame.index,
                            "group": group,
                            "sha256": sha,
                        }
                    )
                    row_hashes.append([file.relative, frame.index, sha, phash])
                if not rows:
                    raise UnreadableImageError(f"{file.path}: contains no frames")
            except Exception as error:  # noqa: BLE001 - one bad file must never stop a build
                reason = str(error) if isinstance(error, UnreadableImageError) else f"{type(error).__name__}: {error}"
                errors.append({"path": file.relative, "reason": reason.removeprefix(f"{file.path}: ")})
                continue
            hashes.extend(row_hashes)
            batch.extend(rows)
            while len(batch) >= _ROWS_PER_BATCH:
                writer.write_table(pa.Table.from_pylist(batch[:_ROWS_PER_BATCH], schema=schema))
                del batch[:_ROWS_PER_BATCH]
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return {"hashes": hashes, "errors": errors}


def _decode_chunk_task(args: tuple[Chunk, IngestOptions, Path]) -> dict[str, Any]:
    return _decode_chunk(*args)


class _Build:
    """The state of an output folder: options, finished chunks, and the de-duplication indexes."""

    def __init__(self, output: Path, options: IngestOptions, overwrite: bool) -> None:
        self.output = output
        self.options = options
        manifest = output / _MANIFEST
        self.records_dir, self.sources_dir, self.staging_dir = (
            manifest / "chunks",
            manifest / "sources",
            manifest / "staging",
        )
        self.data_dir = output / "data"
        options_path = manifest / "options.json"
        wanted = dataclasses.asdict(options)
        if output.exists() and any(output.iterdir()):
            if not options_path.is_file():
                raise UsfmaeError(f"{output} exists and is not an ingest build; choose an empty or new folder")
            if overwrite:
                for name in ("data", _MANIFEST):
                    shutil.rmtree(output / name)
            elif (previous := json.loads(options_path.read_text())) != wanted:
                raise UsfmaeError(f"{output} was built with {previous}, not {wanted}; pass --overwrite to rebuild it")
        for directory in (self.records_dir, self.sources_dir, self.staging_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(options_path, json.dumps(wanted, indent=2))
        self.records = {path.stem: json.loads(path.read_text()) for path in sorted(self.records_dir.glob("*.json"))}
        self.exact: dict[str, dict[str, Any]] = {}
        self.near = None if options.near_dup_threshold is None else NearDuplicateIndex(options.near_dup_threshold)

    def update_sources(self, sources: list[DatasetSource], *, complete: bool, files_per_shard: int) -> list[Chunk]:
        """Record the scanned folders, drop what changed or vanished, and return the chunks to decode.

        A finished chunk (record, shard, de-duplication entries) is dropped when its files changed, or
        when it no longer exists in a folder scanned now; a ``complete`` scan of ROOT also drops the
        chunks of folders that are gone.
        """
        scanned = {source.folder.name for source in sources}
        current = {chunk.key: chunk for source in sources for chunk in _chunks(source, files_per_shard)}
        for source in sources:
            atomic_write_text(self.sources_dir / f"{source.slug}.json", json.dumps(source.summary()))
        if complete:
            for path in self.sources_dir.glob("*.json"):
                if json.loads(path.read_text())["folder"] not in scanned:
                    path.unlink()
        for key, record in list(self.records.items()):
            in_scope = complete or record["folder"] in scanned
            chunk = current.get(key)
            shard_ok = record["shard"] is None or (self.data_dir / record["shard"]).is_file()
            if in_scope and (chunk is None or chunk.fingerprint != record["fingerprint"] or not shard_ok):
                self._forget(key)
        shards = {record["shard"] for record in self.records.values()}
        for path in [*self.data_dir.iterdir(), *self.staging_dir.iterdir()]:
            if path.name not in shards:
                path.unlink()  # left by an interrupted run
        for key in sorted(self.records):
            for path, frame, sha, phash in self.records[key]["kept"]:
                self._keep(self.records[key]["dataset"], path, frame, sha, phash)
        return [current[key] for key in sorted(current) if key not in self.records]

    def _forget(self, key: str) -> None:
        record = self.records.pop(key)
        if record["shard"] is not None:
            (self.data_dir / record["shard"]).unlink(missing_ok=True)
        (self.records_dir / f"{key}.json").unlink(missing_ok=True)

    def _keep(self, dataset: str, path: str, frame: int, sha: str, phash: str) -> None:
        reference = {"dataset": dataset, "path": path, "frame": frame}
        self.exact[sha] = reference
        if self.near is not None:
            self.near.add(int(phash, 16), reference)

    def _duplicate_of(self, sha: str, phash: str) -> dict[str, Any] | None:
        if sha in self.exact:
            return {"kind": "exact", "duplicate_of": self.exact[sha]}
        if self.near is not None and (hit := self.near.find(int(phash, 16))) is not None:
            return {"kind": "near", "duplicate_of": hit[0], "distance": hit[1]}
        return None

    def finish(self, chunk: Chunk, staged: Path, result: dict[str, Any]) -> None:
        """De-duplicate a decoded chunk against the build, write its shard, then its manifest record."""
        keep, kept, duplicates = [], [], []
        for row, (path, frame, sha, phash) in enumerate(result["hashes"]):
            duplicate = self._duplicate_of(sha, phash)
            if duplicate is not None:
                duplicates.append({"path": path, "frame": frame, **duplicate})
                continue
            self._keep(chunk.dataset, path, frame, sha, phash)
            keep.append(row)
            kept.append([path, frame, sha, phash])
        shard = f"train-{chunk.key}.parquet" if keep else None
        if shard is not None:
            self._write_shard(staged, keep, self.data_dir / shard)
        staged.unlink(missing_ok=True)
        record = {
            "key": chunk.key,
            "dataset": chunk.dataset,
            "folder": chunk.folder,
            "fingerprint": chunk.fingerprint,
            "files": len(chunk.files),
            "frames_read": len(result["hashes"]),
            "shard": shard,
            "kept": kept,
            "duplicates": duplicates,
            "errors": result["errors"],
        }
        atomic_write_text(self.records_dir / f"{chunk.key}.json", json.dumps(record))
        self.records[chunk.key] = record

    def _write_shard(self, staged: Path, keep: list[int], shard: Path) -> None:
        """Copy the kept rows of ``staged`` to ``shard`` batch by batch (bounded memory), atomically."""
        import pyarrow.parquet as pq

        keep_set = set(keep)
        temporary = self.staging_dir / f"{shard.name}.tmp"
        source = pq.ParquetFile(staged)
        offset = 0
        with pq.ParquetWriter(temporary, source.schema_arrow) as writer:
            for batch in source.iter_batches(batch_size=_ROWS_PER_BATCH):
                rows = [i for i in range(batch.num_rows) if offset + i in keep_set]
                offset += batch.num_rows
                if rows:
                    writer.write_batch(batch.take(rows))
        os.replace(temporary, shard)

    def report(self, skipped: list[dict[str, str]], root: Path) -> dict[str, Any]:
        """The ingest report of the whole build (every folder ever ingested into it, not only this run's)."""
        datasets = []
        for path in sorted(self.sources_dir.glob("*.json")):
            summary = json.loads(path.read_text())
            records = [r for r in self.records.values() if r["folder"] == summary["folder"]]
            duplicates = [d for r in records for d in r["duplicates"]]
            datasets.append(
                {
                    **summary,
                    "frames_read": sum(r["frames_read"] for r in records),
                    "exact_duplicates": sum(d["kind"] == "exact" for d in duplicates),
                    "near_duplicates": sum(d["kind"] == "near" for d in duplicates),
                    "rows": sum(len(r["kept"]) for r in records),
                    "unreadable": [e for r in records for e in r["errors"]],
                    "duplicates": duplicates,
                }
            )
        return {
            "root": str(root.resolve()),
            "options": dataclasses.asdict(self.options),
            "sha256": "SHA-256 of the decoded full-size (H, W, 3) uint8 RGB pixels, prefixed by the shape",
            "near_duplicates": "imagehash.phash (64 bits) of the full-size frame, Hamming distance <= threshold",
            "rows": sum(d["rows"] for d in datasets),
            "parquet_bytes": sum(path.stat().st_size for path in self.data_dir.glob("*.parquet")),
            "datasets": datasets,
            "skipped_folders": skipped,
        }


def ingest(
    root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    datasets: Sequence[str] | None = None,
    options: IngestOptions = IngestOptions(),
    num_proc: int = 1,
    files_per_shard: int = FILES_PER_SHARD,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or extend) a Parquet image dataset at ``output`` from the dataset folders of ``root``.

    A rerun with the same options decodes only the chunks whose files changed; with ``datasets`` it
    updates those folders and keeps the rest of the build. Returns the ingest report (also written as
    ``ingest_report.json`` and ``ingest_report.md`` in ``output``, beside the dataset card ``README.md``).

    Raises:
        UsfmaeError: bad ``root``/``datasets``, or ``output`` holds something else or a build made
            with other options and ``overwrite`` is false.
    """
    root, output = Path(root), Path(output)
    if files_per_shard < 1 or num_proc < 1:
        raise UsfmaeError("files_per_shard and num_proc must be >= 1")
    if output.resolve().is_relative_to(root.resolve()):
        raise UsfmaeError(f"output {output} must not lie inside ROOT {root}")
    sources, skipped = discover_sources(root, datasets=datasets, include_heldout=options.include_heldout)
    build = _Build(output, options, overwrite)
    pending = build.update_sources(sources, complete=datasets is None, files_per_shard=files_per_shard)
    tasks = [(chunk, options, build.staging_dir / f"{chunk.key}.parquet") for chunk in pending]
    bar = tqdm(total=sum(len(c.files) for c in pending), unit="file", desc="ingest", disable=not progress)
    with bar, contextlib.ExitStack() as stack:
        mapper = stack.enter_context(ProcessPoolExecutor(num_proc)).map if num_proc > 1 else map
        for (chunk, _, staged), result in zip(tasks, mapper(_decode_chunk_task, tasks)):
            build.finish(chunk, staged, result)
            bar.update(len(chunk.files))
            bar.set_postfix_str(chunk.dataset)
    report = build.report(skipped, root)
    atomic_write_text(output / "ingest_report.json", json.dumps(report, indent=2))
    atomic_write_text(output / "ingest_report.md", _summary(report))
    atomic_write_text(output / "README.md", _dataset_card(report))
    return report


def _summary(report: dict[str, Any]) -> str:
    lines = [
        "# Ingest report",
        "",
        f"ROOT: `{report['root']}`; options: {report['options']}; {report['rows']} rows in all.",
        "",
        "| dataset | folder | rules | files | skipped by rules | frames | exact dups | near dups | unreadable | rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in report["datasets"]:
        name = d["dataset"] if d["in_catalogue"] else f"{d['dataset']} (not in catalogue)"
        counts = [d["files"], sum(d["excluded_by_rules"].values()), d["frames_read"], d["exact_duplicates"]]
        counts += [d["near_duplicates"], len(d["unreadable"]), d["rows"]]
        lines.append(f"| {name} | {d['folder']} | {d['layout_rules']} | " + " | ".join(map(str, counts)) + " |")
    if report["skipped_folders"]:
        lines += ["", "## Skipped folders", ""] + [f"- {s['folder']}: {s['reason']}" for s in report["skipped_folders"]]
    unreadable = [e for d in report["datasets"] for e in d["unreadable"]]
    if unreadable:
        lines += ["", "## Unreadable files (skipped)", ""] + [f"- `{e['path']}`: {e['reason']}" for e in unreadable]
    lines += ["", "## Excluded by the layout rules (examples)", ""]
    for d in report["datasets"]:
        for reason, examples in d["excluded_examples"].items():
            lines.append(f"- {d['dataset']}: {d['excluded_by_rules'][reason]} x {reason}, e.g. `{examples[0]}`")
    lines += ["", "Every duplicate, with the row it duplicates, is listed in `ingest_report.json`.", ""]
    return "\n".join(lines)


def _dataset_card(report: dict[str, Any]) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        license="other",
        task_categories=["image-feature-extraction"],
        tags=["ultrasound", "medical-imaging", "openus-46", "usf-mae"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        dataset_info={
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "dataset", "dtype": "string"},
                {"name": "path", "dtype": "string"},
                {"name": "frame", "dtype": "int32"},
                {"name": "group", "dtype": "string"},
                {"name": "sha256", "dtype": "string"},
            ],
            # datasets caches a local folder under a hash of this YAML (not of the files): sizes that
            # change with the content keep a rebuilt or another same-named build from hitting a stale cache.
            "splits": [{"name": "train", "num_bytes": report["parquet_bytes"], "num_examples": report["rows"]}],
            "download_size": report["parquet_bytes"],
            "dataset_size": report["parquet_bytes"],
        },
    )
    options = report["options"]
    stored = f"resized to {options['resize']}x{options['resize']} (NEAREST)" if options["resize"] else "at full size"
    table = "\n".join(
        f"| {d['dataset']} | {'yes' if d['in_catalogue'] else 'no'} | {d['rows']} |" for d in report["datasets"]
    )
    content = f"""---
{data.to_yaml()}
---

# Ultrasound pretraining images (OpenUS-46 ingest)

Built with `usfmae ingest` from locally downloaded copies of public ultrasound datasets, for
USF-MAE-style masked-autoencoder pretraining. Each source dataset keeps its own licence and terms of
use: check them before redistributing this build.

- Columns: `image` (PNG, {stored}; 8-bit grey when the source is grey: call `.convert("RGB")` as
  USF-MAE's loader does), `dataset` (catalogue name, or folder name outside the catalogue), `path`
  (source file relative to the ingest root), `frame` (frame or slice index in the file), `group`
  (patient/group id where the layout defines one, else null), `sha256` ({report["sha256"]}).
- Masks, annotations, label maps and non-ultrasound modalities were left out by the catalogue's
  layout rules and the generic `*_mask*`, `*_gt*`, `*Annotation*` rules.
- Exact duplicates (same `sha256`) and near duplicates ({report["near_duplicates"]},
  threshold {options["near_dup_threshold"]}) were removed; see `ingest_report.json`.
- Held-out evaluation datasets (BUS-BRA, MMOTU-2D, GIST514-DB) are excluded unless the build was made
  with `--include-heldout`. Frame stride {options["frame_stride"]}, slice stride {options["slice_stride"]}.

| dataset | in OpenUS-46 | rows |
|---|---|---|
{table}

{report["rows"]} rows in all.

```python
from datasets import load_dataset
ds = load_dataset("path/or/repo", split="train")
```
"""
    return str(DatasetCard(content))


def push_build_to_hub(
    output: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a build (card, reports, Parquet shards) to the dataset repo ``repo_id``; return the commit URL.

    Shards that are no longer in the build are deleted from the repo in the same commit.
    """
    from huggingface_hub import HfApi

    output = Path(output)
    if not (output / _MANIFEST / "options.json").is_file():
        raise UsfmaeError(f"{output} is not an ingest build")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=output,
        allow_patterns=["README.md", "ingest_report.json", "ingest_report.md", "data/*.parquet"],
        delete_patterns=["data/*.parquet"],
        commit_message="Upload ultrasound ingest build (usfmae ingest)",
    )
    return str(commit)
