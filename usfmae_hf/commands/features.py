"""``usfmae features``: encoder features of images, DICOMs, volumes and videos into one file.

On several GPUs, CPUs or nodes, run it under a launcher; the processes share the inputs and write the
one Parquet file (same rows, same order) a single process writes, resumable per process::

    accelerate launch --multi_gpu --num_processes 4 -m usfmae_hf.commands.features SCANS/ \\
        --model usfmae-hf --output features.parquet
    torchrun --nproc_per_node 4 -m usfmae_hf.commands.features SCANS/ --model usfmae-hf --output features.parquet

(``python -m usfmae_hf.commands.features ARGS`` is ``usfmae features ARGS``; see
:mod:`usfmae_hf.inference.distributed_features` for how the work is shared.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from usfmae_hf.commands import positive_int, torch_device

# usfmae_hf.precision.PRECISIONS, spelled out: importing that module (torch) would slow every command's start.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype auto|fp32|bf16|fp16`` (default auto), shared by the inference commands."""
    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="compute precision; auto: bf16 on CPUs with AMX or AVX-512 BF16 and on GPUs of compute capability "
        "8.0+, else fp32; fp16 only on GPUs (default: auto)",
    )


def resume_command(args: argparse.Namespace, processes: int = 1) -> str:
    """The command line that resumes ``args``' run: the same settings, spelled out, without ``--overwrite``
    (which would start clean; the interrupted run's permission to replace the output is kept), under an
    ``accelerate launch`` of ``processes`` processes if more than one."""
    words = ["usfmae", "features"]
    if processes > 1:
        words = [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "-m",
            "usfmae_hf.commands.features",
        ]
    words += [*args.inputs, "--model", str(args.model), "--output", str(args.output)]
    for flag, value in (
        ("--pooling", args.pooling),
        ("--batch-size", args.batch_size),
        ("--frame-stride", args.frame_stride),
        ("--slice-stride", args.slice_stride),
        ("--axis", args.axis),
        ("--dtype", args.dtype),
        ("--device", args.device),
    ):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words + (["--quiet"] if args.quiet else []))


def run_features(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from usfmae_hf.errors import UsfmaeError
    from usfmae_hf.failures import EXIT_EXPECTED, EXIT_INTERRUPTED
    from usfmae_hf.inference.distributed_features import (
        is_main_process,
        launched_processes,
        write_features_distributed,
    )
    from usfmae_hf.inference.feature_files import FeaturesInterrupted
    from usfmae_hf.precision import describe_precision

    processes, main = launched_processes(), is_main_process()
    if processes == 1:
        if os.environ.get("MASTER_PORT") and "WORLD_SIZE" not in os.environ:
            print(
                "usfmae features: warning: a launcher asked for several processes (MASTER_PORT is set without "
                "WORLD_SIZE) but 1 is running; `accelerate launch --cpu` starts one: use `accelerate launch "
                "--multi_gpu --num_processes N` (on CPUs too) or `torchrun --nproc_per_node N`",
                file=sys.stderr,
            )
        print(f"precision: {describe_precision(args.dtype, args.device)}")
    try:
        result = write_features_distributed(
            args.inputs,
            args.model,
            args.output,
            pooling=args.pooling,
            batch_size=args.batch_size,
            frame_stride=args.frame_stride,
            slice_stride=args.slice_stride,
            axis=args.axis,
            device=args.device,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.quiet,
            on_skip=lambda message: tqdm.write(f"skipped {message}", file=sys.stderr),
            log=print,
        )
    except FeaturesInterrupted as interrupted:
        if not main:
            return EXIT_INTERRUPTED
        again = "re-run the same command" + (" without --overwrite" if args.overwrite else "")
        if processes > 1:
            again += f" on {processes} processes"
        print(f"usfmae features: {interrupted}; to resume, {again}: {resume_command(args, processes)}", file=sys.stderr)
        raise
    except (UsfmaeError, KeyboardInterrupt) as error:
        if main:
            raise
        # process 0 reports it (every process of the launch fails the same way)
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else EXIT_EXPECTED
    if not main:
        return 0
    resumed = f" ({result.resumed_files} resumed from an interrupted run)" if result.resumed_files else ""
    skipped = f"; {len(result.skipped)} unreadable file(s) skipped" if result.skipped else ""
    on = f" by {result.processes} processes" if result.processes > 1 else ""
    print(f"wrote {result.rows} feature rows from {result.files} file(s){resumed} to {result.output}{on}{skipped}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "features",
        help="extract USF-MAE encoder features into a .parquet or .npy file",
        description="Encode every frame of the inputs (images, DICOM incl. cines, NIfTI/MHA/NRRD volumes as "
        "slices, videos) with a converted USF-MAE encoder, preprocessed exactly as in USF-MAE. Unreadable "
        "files are reported and skipped. Finished rows are saved in OUTPUT.partial/ every few seconds: "
        "rerunning the same command after an interruption (Ctrl-C, a crash) resumes, provided nothing that "
        "changes the numbers (model files, pooling, strides, --dtype) changed; --overwrite starts clean. "
        "Under a launcher (`accelerate launch --multi_gpu --num_processes N -m usfmae_hf.commands.features ...`, "
        "or torchrun), the N processes (GPUs, or CPUs over gloo) share the inputs in contiguous slices and "
        "write the same FILE.parquet, rows in the same order, as one process; each resumes from its own "
        "OUTPUT.partial/rank-* shards.",
    )
    parser.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument(
        "--model", "-m", type=Path, required=True, help="converted model directory (vitmae or vit format)"
    )
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        help="FILE.parquet (columns path, frame, features; settings in the schema metadata) or FILE.npy "
        "(array; rows listed in FILE.csv, settings in FILE.json)",
    )
    parser.add_argument(
        "--pooling",
        choices=("cls", "mean", "patches"),
        default="cls",
        help="cls: CLS token; mean: mean of patch tokens; patches: all patch tokens in spatial order (default: cls)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="frames per forward pass (default: 32)")
    parser.add_argument(
        "--frame-stride", type=positive_int, default=1, help="keep every n-th frame of cines and videos (default: 1)"
    )
    parser.add_argument(
        "--slice-stride", type=positive_int, default=1, help="keep every n-th slice of 3-D volumes (default: 1)"
    )
    parser.add_argument(
        "--axis",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="volume axis to slice along, in (z, y, x) order (default: 0)",
    )
    parser.add_argument(
        "--device",
        type=torch_device,
        default=None,
        help="torch device, e.g. cpu or cuda (default: cpu; under a launcher: each process's own device)",
    )
    add_dtype_argument(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file; discard any interrupted run"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_features)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m usfmae_hf.commands.features ARGS``: ``usfmae features ARGS``, for launchers that run modules."""
    from usfmae_hf.cli import main as cli_main

    return cli_main(["features", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
