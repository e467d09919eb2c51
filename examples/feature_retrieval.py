#!/usr/bin/env python
"""Find similar ultrasound scans: USF-MAE encoder features and k-nearest-neighbour retrieval.

Every frame of every readable file under ``--images`` (images, DICOMs incl. cines, volumes as slices,
videos) is encoded with :func:`usfmae_hf.inference.write_features` (deterministic, no masking) into
``OUTPUT_DIR/features.parquet``. scikit-learn's ``NearestNeighbors`` (cosine distance) then finds the
``--k`` most similar indexed frames of every query: each ``--query`` file's frames, or, without
``--query``, every indexed frame itself (leave-one-out: a frame is never its own neighbour). The
answer is ``OUTPUT_DIR/neighbours.csv`` (query_path, query_frame, rank, path, frame, cosine_distance).

Example::

    python examples/feature_retrieval.py --model usfmae-base --images /data/scans --k 5 --output-dir runs/retrieval

Reduced size (seconds on CPU): a small folder, ``--frame-stride 10`` for cines, ``--batch-size 8``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.neighbors import NearestNeighbors

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.commands import positive_int, torch_device
from usfmae_hf.failures import run_reporting_failures
from usfmae_hf.inference import write_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", required=True, help="converted model directory (vitmae or vit format)")
    parser.add_argument("--images", nargs="+", required=True, help="files or folders to index (searched recursively)")
    parser.add_argument("--query", nargs="+", default=None, help="files to look up (default: every indexed frame)")
    parser.add_argument("--k", type=positive_int, default=5, help="neighbours per query (default: 5)")
    parser.add_argument("--pooling", choices=("cls", "mean"), default="cls", help="feature pooling (default: cls)")
    parser.add_argument(
        "--frame-stride", type=positive_int, default=1, help="keep every n-th cine/video frame (default: 1)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="frames per forward pass (default: 32)")
    parser.add_argument(
        "--device", type=torch_device, default=None, help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument("--output-dir", "-o", type=Path, required=True, help="folder for the features and the CSV")
    parser.add_argument("--overwrite", action="store_true", help="replace feature files left by an earlier run")
    return parser.parse_args(argv)


def encode(inputs: list[str], output: Path, args: argparse.Namespace) -> tuple[list[tuple[str, int]], np.ndarray]:
    """Features of every kept frame of ``inputs``: ``[(path, frame), ...]`` and an ``(N, D)`` array."""
    write_features(
        inputs,
        args.model,
        output,
        pooling=args.pooling,
        batch_size=args.batch_size,
        frame_stride=args.frame_stride,
        device=args.device,
        overwrite=args.overwrite,
        progress=False,
        on_skip=lambda message: print(f"skipped {message}", file=sys.stderr),
    )
    table = pq.read_table(output).to_pydict()
    return list(zip(table["path"], table["frame"])), np.asarray(table["features"], dtype=np.float32)


def retrieve(args: argparse.Namespace) -> None:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    index_rows, index_features = encode(args.images, args.output_dir / "features.parquet", args)
    if args.query:
        query_rows, query_features = encode(args.query, args.output_dir / "query_features.parquet", args)
    else:
        query_rows, query_features = index_rows, index_features
    # One extra neighbour for leave-one-out: the query frame itself, dropped below.
    k = min(args.k + (args.query is None), len(index_rows))
    search = NearestNeighbors(n_neighbors=k, metric="cosine").fit(index_features)
    distances, neighbours = search.kneighbors(query_features)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query_path", "query_frame", "rank", "path", "frame", "cosine_distance"])
    for query, row_distances, row_neighbours in zip(query_rows, distances, neighbours):
        found = [
            (index_rows[n], d) for n, d in zip(row_neighbours, row_distances) if args.query or index_rows[n] != query
        ]
        for rank, ((path, frame), distance) in enumerate(found[: args.k], start=1):
            writer.writerow([*query, rank, path, frame, f"{distance:.6f}"])
    output = args.output_dir / "neighbours.csv"
    atomic_write_text(output, buffer.getvalue())
    print(f"indexed {len(index_rows)} frame(s); wrote {output} for {len(query_rows)} query frame(s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_failures(lambda: retrieve(args), "feature_retrieval")


if __name__ == "__main__":
    sys.exit(main())
