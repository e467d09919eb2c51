"""Turn unpacked OpenUS-46 folders into one de-duplicated Hugging Face dataset of Parquet shards.

The build ties the steps together: :mod:`usfmae_hf.ingest.discover` lists the image files of each
dataset folder of ROOT and cuts them into chunks; :mod:`usfmae_hf.ingest.decode` turns a chunk
(in a worker process) into a staged Parquet file; here each decoded chunk is de-duplicated
(:mod:`usfmae_hf.ingest.dedup`) and becomes one shard ``data/train-<folder>-<NNNNN>.parquet`` plus
one manifest record ``.manifest/chunks/<key>.json`` written after it; :mod:`usfmae_hf.ingest.report`
writes the summary and the dataset card. A rerun skips every chunk whose files (names, sizes,
modification times) did not change, so an interrupted or extended build only decodes what is new.

De-duplication runs in the main process in chunk order, so that it is deterministic whatever the
number of workers. Rows already in the build take precedence over new ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest.decode import ROWS_PER_BATCH, decode_chunk_task
from usfmae_hf.ingest.dedup import Deduplicator
from usfmae_hf.ingest.discover import FILES_PER_SHARD, Chunk, DatasetSource, discover_sources, split_into_chunks
from usfmae_hf.ingest.options import IngestOptions
from usfmae_hf.ingest.report import render_dataset_card, render_summary

__all__ = ["MANIFEST_DIR", "IngestOptions", "ingest"]

#: Folder of a build holding its options, chunk records, source summaries and staged chunks.
MANIFEST_DIR = ".manifest"


class _Build:
    """The state of an output folder: options, finished chunks, and the de-duplication indexes."""

    def __init__(self, output: Path, options: IngestOptions, overwrite: bool) -> None:
        self.output = output
        self.options = options
        manifest = output / MANIFEST_DIR
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
                for name in ("data", MANIFEST_DIR):
                    shutil.rmtree(output / name)
            elif (previous := json.loads(options_path.read_text())) != wanted:
                raise UsfmaeError(f"{output} was built with {previous}, not {wanted}; pass --overwrite to rebuild it")
        for directory in (self.records_dir, self.sources_dir, self.staging_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(options_path, json.dumps(wanted, indent=2))
        self.records = {path.stem: json.loads(path.read_text()) for path in sorted(self.records_dir.glob("*.json"))}
        self.dedup = Deduplicator(options.near_dup_threshold)

    def update_sources(self, sources: list[DatasetSource], *, complete: bool, files_per_shard: int) -> list[Chunk]:
        """Record the scanned folders, drop what changed or vanished, and return the chunks to decode.

        A finished chunk (record, shard, de-duplication entries) is dropped when its files changed, or
        when it no longer exists in a folder scanned now; a ``complete`` scan of ROOT also drops the
        chunks of folders that are gone.
        """
        scanned = {source.folder.name for source in sources}
        current = {chunk.key: chunk for source in sources for chunk in split_into_chunks(source, files_per_shard)}
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
                self.dedup.keep(self.records[key]["dataset"], path, frame, sha, phash)
        return [current[key] for key in sorted(current) if key not in self.records]

    def _forget(self, key: str) -> None:
        record = self.records.pop(key)
        if record["shard"] is not None:
            (self.data_dir / record["shard"]).unlink(missing_ok=True)
        (self.records_dir / f"{key}.json").unlink(missing_ok=True)

    def finish(self, chunk: Chunk, staged: Path, result: dict[str, Any]) -> None:
        """De-duplicate a decoded chunk against the build, write its shard, then its manifest record."""
        keep, kept, duplicates = [], [], []
        for row, (path, frame, sha, phash) in enumerate(result["hashes"]):
            duplicate = self.dedup.duplicate_of(sha, phash)
            if duplicate is not None:
                duplicates.append({"path": path, "frame": frame, **duplicate})
                continue
            self.dedup.keep(chunk.dataset, path, frame, sha, phash)
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
            for batch in source.iter_batches(batch_size=ROWS_PER_BATCH):
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
        for (chunk, _, staged), result in zip(tasks, mapper(decode_chunk_task, tasks)):
            build.finish(chunk, staged, result)
            bar.update(len(chunk.files))
            bar.set_postfix_str(chunk.dataset)
    report = build.report(skipped, root)
    atomic_write_text(output / "ingest_report.json", json.dumps(report, indent=2))
    atomic_write_text(output / "ingest_report.md", render_summary(report))
    atomic_write_text(output / "README.md", render_dataset_card(report))
    return report
