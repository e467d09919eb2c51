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

A build holds an exclusive lock (``flock`` on ``.manifest/ingest.lock``) while it runs, so a second
run into the same folder stops at once naming the process that builds it; its decoding processes end
with it, even when it is killed, and whatever a killed run left half-written (staged chunks, shards
without a record, temporary files, all under names the build gives them) is removed by the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest.decode import ROWS_PER_BATCH, decode_chunk_task, end_with_parent
from usfmae_hf.ingest.dedup import Deduplicator
from usfmae_hf.ingest.discover import FILES_PER_SHARD, Chunk, DatasetSource, discover_sources, split_into_chunks
from usfmae_hf.ingest.options import IngestOptions
from usfmae_hf.ingest.report import render_dataset_card, render_summary
from usfmae_hf.io.limits import max_decoded_bytes as resolve_max_decoded_bytes

__all__ = ["MANIFEST_DIR", "IngestOptions", "ingest"]

#: Folder of a build holding its options, chunk records, source summaries and staged chunks.
MANIFEST_DIR = ".manifest"
#: File in MANIFEST_DIR locked (``flock``) by the running build; it names the process.
LOCK_FILE = "ingest.lock"
# Workers must be children of the build process for end_with_parent: fork on Linux (its default up to
# Python 3.13; 3.14's forkserver would make them grandchildren), the platform's default (spawn) elsewhere.
_WORKER_CONTEXT = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
# How long a lock still held by a process that no longer exists is waited for (normally milliseconds).
_DEAD_HOLDER_WAIT_S = 2.0
#: Files at the top of a build, written atomically (a killed run can leave their temporaries).
_REPORT_FILES = ("ingest_report.json", "ingest_report.md", "README.md")


def _refuse_foreign_output(output: Path) -> None:
    """Refuse an ``output`` that exists and holds something other than a build (or a build's bare manifest)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise UsfmaeError(f"{output} is a file; choose an empty or new folder")
    if not (output / MANIFEST_DIR / "options.json").is_file() and any(
        path.name != MANIFEST_DIR for path in output.iterdir()
    ):
        raise UsfmaeError(f"{output} exists and is not an ingest build; choose an empty or new folder")


def _is_dead_local_process(holder: str) -> bool:
    """Whether ``holder`` (a lock file's ``process PID on HOST``) names a process of this host that is gone."""
    match = re.fullmatch(r"process (\d+) on (\S+)", holder)
    if match is None or match.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        return False
    return False


@contextlib.contextmanager
def _exclusive_lock(output: Path) -> Iterator[None]:
    """Hold the build lock of ``output`` (created if needed) for the ``with`` block.

    A folder this call created is removed again if the block fails before the build wrote its options.

    Raises:
        UsfmaeError: another process holds the lock (the message names it).
    """
    import fcntl

    created = not output.exists()
    lock_path = output / MANIFEST_DIR / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+", encoding="utf-8") as handle:
        deadline = time.monotonic() + _DEAD_HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                if _is_dead_local_process(holder) and time.monotonic() < deadline:
                    time.sleep(0.02)  # the kernel releases a killed process's lock a few ms after it is gone
                    continue
                raise UsfmaeError(
                    f"{output} is being built by {holder or 'another process'} (it holds {lock_path}); "
                    "wait for that run to end or stop it"
                ) from None
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")  # read by _is_dead_local_process
        handle.flush()
        try:
            yield
        except BaseException:
            if created and not (output / MANIFEST_DIR / "options.json").exists():
                shutil.rmtree(output, ignore_errors=True)
            raise


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
        self.manifest_dir = manifest
        self.data_dir = output / "data"
        options_path = manifest / "options.json"
        wanted = dataclasses.asdict(options)
        if options_path.is_file():
            if overwrite:
                if self.data_dir.exists():
                    shutil.rmtree(self.data_dir)
                for path in manifest.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.name != LOCK_FILE:  # the lock stays held through the rebuild
                        path.unlink()
            elif (previous := json.loads(options_path.read_text())) != wanted:
                raise UsfmaeError(f"{output} was built with {previous}, not {wanted}; pass --overwrite to rebuild it")
        for directory in (self.records_dir, self.sources_dir, self.staging_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(options_path, json.dumps(wanted, indent=2))
        self.records = {path.stem: json.loads(path.read_text()) for path in sorted(self.records_dir.glob("*.json"))}
        self.dedup = Deduplicator(options.near_dup_threshold)

    def update_sources(
        self, sources: list[DatasetSource], *, complete: bool, files_per_shard: int, max_decoded_bytes: int
    ) -> list[Chunk]:
        """Record the scanned folders, drop what changed or vanished, and return the chunks to decode.

        A finished chunk (record, shard, de-duplication entries) is dropped when its files changed,
        when it no longer exists in a folder scanned now, or when it skipped a file as too large that
        ``max_decoded_bytes`` now allows; a ``complete`` scan of ROOT also drops the chunks of folders
        that are gone.
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
            allowed_now = any(
                e.get("decoded_bytes", max_decoded_bytes + 1) <= max_decoded_bytes for e in record["errors"]
            )
            if in_scope and (
                chunk is None or chunk.fingerprint != record["fingerprint"] or not shard_ok or allowed_now
            ):
                self._forget(key)
        self._remove_leftovers()
        for key in sorted(self.records):
            for path, frame, sha, phash in self.records[key]["kept"]:
                self.dedup.keep(self.records[key]["dataset"], path, frame, sha, phash)
        return [current[key] for key in sorted(current) if key not in self.records]

    def _remove_leftovers(self) -> None:
        """Delete what an interrupted or killed run left: only files of the names a build writes.

        Called with the lock held, so no other run is writing them.
        """
        shards = {record["shard"] for record in self.records.values()}
        stale = [path for path in self.data_dir.glob("train-*.parquet") if path.name not in shards]
        stale += [*self.staging_dir.glob("*.parquet"), *self.staging_dir.glob("*.parquet.tmp")]
        for directory in (self.records_dir, self.sources_dir):
            stale += directory.glob(".*.json.*.tmp")  # atomic_write_text temporaries
        stale += self.manifest_dir.glob(".options.json.*.tmp")
        for name in _REPORT_FILES:
            stale += self.output.glob(f".{name}.*.tmp")
        for path in stale:
            path.unlink(missing_ok=True)

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
            unreadable_paths = summary.pop("unreadable", [])  # found unreadable by the scan, never decoded
            records = [r for r in self.records.values() if r["folder"] == summary["folder"]]
            duplicates = [d for r in records for d in r["duplicates"]]
            datasets.append(
                {
                    **summary,
                    "frames_read": sum(r["frames_read"] for r in records),
                    "exact_duplicates": sum(d["kind"] == "exact" for d in duplicates),
                    "near_duplicates": sum(d["kind"] == "near" for d in duplicates),
                    "rows": sum(len(r["kept"]) for r in records),
                    "unreadable": unreadable_paths + [e for r in records for e in r["errors"]],
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
    max_decoded_bytes: int | None = None,
) -> dict[str, Any]:
    """Build (or extend) a Parquet image dataset at ``output`` from the dataset folders of ``root``.

    A rerun with the same options decodes only the chunks whose files changed; with ``datasets`` it
    updates those folders and keeps the rest of the build. Returns the ingest report (also written as
    ``ingest_report.json`` and ``ingest_report.md`` in ``output``, beside the dataset card ``README.md``).
    Files that cannot be read, or whose header claims more than ``max_decoded_bytes`` of decoded pixels
    (``None``: ``USFMAE_MAX_DECODED_MB`` or 2 GiB, see :mod:`usfmae_hf.io.limits`), are listed there
    and skipped; a rerun with a higher limit decodes the ones it now allows.

    Raises:
        UsfmaeError: bad ``root``/``datasets``/limit, ``output`` holds something else or a build made
            with other options and ``overwrite`` is false, or another process is building ``output``.
    """
    root, output = Path(root), Path(output)
    if files_per_shard < 1 or num_proc < 1:
        raise UsfmaeError("files_per_shard and num_proc must be >= 1")
    limit = resolve_max_decoded_bytes(max_decoded_bytes)
    if output.resolve().is_relative_to(root.resolve()):
        raise UsfmaeError(f"output {output} must not lie inside ROOT {root}")
    _refuse_foreign_output(output)
    with _exclusive_lock(output):
        sources, skipped = discover_sources(root, datasets=datasets, include_heldout=options.include_heldout)
        build = _Build(output, options, overwrite)
        pending = build.update_sources(
            sources, complete=datasets is None, files_per_shard=files_per_shard, max_decoded_bytes=limit
        )
        tasks = [(chunk, options, build.staging_dir / f"{chunk.key}.parquet", limit) for chunk in pending]
        with contextlib.ExitStack() as stack:
            mapper = map
            if num_proc > 1:
                workers = ProcessPoolExecutor(
                    num_proc, mp_context=_WORKER_CONTEXT, initializer=end_with_parent, initargs=(os.getpid(),)
                )
                mapper = stack.enter_context(workers).map
            results = mapper(decode_chunk_task, tasks)  # forks the workers, before tqdm starts its monitor thread
            total = sum(len(c.files) for c in pending)
            bar = stack.enter_context(tqdm(total=total, unit="file", desc="ingest", disable=not progress))
            for (chunk, _, staged, _), result in zip(tasks, results):
                build.finish(chunk, staged, result)
                bar.update(len(chunk.files))
                bar.set_postfix_str(chunk.dataset)
        report = build.report(skipped, root)
        atomic_write_text(output / "ingest_report.json", json.dumps(report, indent=2))
        atomic_write_text(output / "ingest_report.md", render_summary(report))
        atomic_write_text(output / "README.md", render_dataset_card(report))
    return report
