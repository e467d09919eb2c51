"""Feature files on several processes (GPUs, CPUs, nodes), under ``accelerate launch`` or ``torchrun``::

    accelerate launch --multi_gpu --num_processes 4 -m usfmae_hf.commands.features SCANS/ \\
        --model usfmae-hf --output features.parquet

``torchrun --nproc_per_node 4 -m usfmae_hf.commands.features ...`` does the same, and so does ``usfmae
features`` run by either launcher. Each process takes its launcher's device (``cuda:LOCAL_RANK``); on
machines without GPUs (or with ``--device cpu``) the processes run on CPUs and talk over gloo.

The result is the one ``.parquet`` file a 1-process run writes, with the same rows in the same order:
process 0 expands the inputs (:func:`usfmae_hf.io.expand_inputs`: sorted, each real file once) and sends
the list to all; process ``r`` of ``n`` encodes the contiguous slice ``files[r*N//n : (r+1)*N//n]`` and
commits its rows to its own shard directory ``OUTPUT.partial/rank-RRRRR-of-NNNNN/``, with the 1-process
machinery of :mod:`usfmae_hf.inference.feature_files`; once every process is done, process 0 writes the
output (slices in order, atomically; the metadata adds ``processes``) and removes the partial directory.

Rerunning the same launch after an interruption resumes every process from its own shards; the settings
of each (model files, processor, pooling, strides, dtype, process index and count) must match, and an
interrupted run on another number of processes is refused, naming it (``--overwrite`` starts clean).
All processes must compute the same numbers: a run whose processes would pick different precisions
(``--dtype auto`` on unlike machines) is refused. The output must be on a file system that every
process sees (one machine, or a disk shared by the nodes). Only Parquet outputs; only process 0 shows
progress and log lines.

Inputs are files, folders and globs, as for one process; datasets (an ingest build, a Hub dataset) are
not inputs of ``usfmae features``.
"""

from __future__ import annotations

import datetime
import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.failures import describe_expected, one_line
from usfmae_hf.inference.feature_files import (
    REPLACES_OUTPUT,
    FeatureRun,
    FeatureSetup,
    FeaturesInterrupted,
    Shards,
    claim_output,
    encode_files,
    load_for_features,
    partial_directory,
    rank_directory,
    write_features,
    write_output,
)
from usfmae_hf.io import expand_inputs

# How long a process may wait for the others (a collective's timeout): the slowest process's slice can
# take hours longer than the fastest's (a long cine), and a dead process ends the launch anyway.
_WAIT = datetime.timedelta(days=1)


class OtherProcessFailed(UsfmaeError):
    """Another process of the launch failed; it reports its own error."""


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``torchrun`` and ``accelerate launch``)."""
    value = (os.environ if environ is None else environ).get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is process 0 of its launch (``RANK``), or not launched at all."""
    return (os.environ if environ is None else environ).get("RANK", "0").strip() in ("", "0")


def process_slice(files: Sequence[str], rank: int, processes: int) -> list[str]:
    """The contiguous part of ``files`` that process ``rank`` of ``processes`` encodes (sizes differ by at most 1)."""
    count = len(files)
    return list(files[count * rank // processes : count * (rank + 1) // processes])


def write_features_distributed(
    inputs: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> FeatureRun:
    """:func:`usfmae_hf.inference.feature_files.write_features`, shared among the processes of a launch.

    Called by every process of the launch with the same arguments; returns the same :class:`FeatureRun`
    on each. Without a launcher (``WORLD_SIZE`` unset or 1) it is :func:`write_features`. See the module
    docstring for how the work is shared, resumed and merged.

    Args:
        log: called on process 0 with the run's summary lines (precision, processes).
        options: the keyword arguments of :func:`write_features`, with these differences: ``device`` is
            ``None`` (each process's own device from the launcher) or a device type (``"cuda"``,
            ``"cpu"``), never one device index for all; ``on_skip`` is called on process 0 only, with the
            unreadable files of every process.

    Raises:
        UsfmaeError: as :func:`write_features`; the output is not ``.parquet``; ``device`` names one
            device index; the processes would compute different numbers; the partial directory holds a
            run on another number of processes; :class:`OtherProcessFailed` when another process failed.
        FeaturesInterrupted: on every process when one of them was interrupted, with the rows all hold.
    """
    if launched_processes() == 1:
        return write_features(inputs, model, output, **options)
    bound = inspect.signature(write_features).bind(inputs, model, output, **options)  # TypeError if unknown
    bound.apply_defaults()
    options = {name: value for name, value in bound.arguments.items() if name not in ("inputs", "model", "output")}
    device = options["device"]
    output = Path(output)
    if output.suffix != ".parquet":
        raise UsfmaeError(f"{output}: several processes write one Parquet file: name the output FILE.parquet")
    if device is not None and torch.device(device).index is not None:
        raise UsfmaeError(
            f"--device {device}: with several processes each one uses its own device; "
            f"pass --device {torch.device(device).type} or leave --device out"
        )
    created = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    state = None
    try:
        state = _process_state(device)
        if device is not None and torch.device(device).type != state.device.type:
            raise UsfmaeError(f"--device {device}: the launched processes run on {state.device.type}")
        return _Run(state, output, options).run(inputs, model, log or (lambda line: None))
    finally:
        if created and state is not None:
            state.destroy_process_group()
            type(state)._reset_state()


def _process_state(device: str | torch.device | None) -> Any:
    """accelerate's ``PartialState`` of this process: the launcher's accelerator, else CPUs over gloo."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (device is not None and torch.device(device).type == "cpu")
    state = PartialState(cpu=cpu, timeout=_WAIT)
    if state.num_processes == 1 and not cpu:  # no accelerator with a distributed backend here
        PartialState._reset_state()
        state = PartialState(cpu=True, timeout=_WAIT)
    return state


@dataclass
class _Outcome:
    """What one process sends the others after a step."""

    value: Any = None
    failure: str | None = None  # the one-line error of a failed step
    interrupted: bool = False
    committed: tuple[int, int] = (0, 0)  # rows and complete files in this process's shards


class _Run:
    """One multi-process feature run, seen from one of its processes."""

    def __init__(self, state: Any, output: Path, options: dict[str, Any]) -> None:
        self.state, self.output, self.options = state, output, options
        self.overwrite = options["overwrite"]
        self.rank, self.processes = state.process_index, state.num_processes
        self.main = state.is_main_process
        self.partial = partial_directory(output)
        self.device = torch.device("cpu") if state.device.type == "cpu" else state.device
        self.setup: FeatureSetup | None = None
        self.shards: Shards | None = None

    def together(self, step: Callable[[], Any], *, writing: bool = False) -> list[Any]:
        """Run ``step`` here; every process's value, in process order, once all have run theirs.

        A failure anywhere fails every process (each one that failed raises its own error, the others
        :class:`OtherProcessFailed`), and so does Ctrl-C (``FeaturesInterrupted`` with the rows committed
        by all processes while ``writing``), so that no process is left waiting for another.
        """
        from accelerate.utils import gather_object

        error: BaseException | None = None
        try:
            outcome = _Outcome(value=step())
        except KeyboardInterrupt as caught:
            error, outcome = caught, _Outcome(interrupted=True)
        except Exception as caught:
            message = describe_expected(caught) or f"{type(caught).__name__}: {one_line(str(caught))}"
            error, outcome = caught, _Outcome(failure=message)
        if writing:
            outcome.committed = (self.shards.row_count, len(self.shards.complete))
        outcomes = gather_object([outcome])
        failed = [(index, other.failure) for index, other in enumerate(outcomes) if other.failure]
        if failed:
            if outcome.failure:
                raise error
            index, message = failed[0]
            raise OtherProcessFailed(f"process {index} of {self.processes} failed: {message}")
        if any(other.interrupted for other in outcomes):
            if not writing:
                raise error or KeyboardInterrupt()
            rows, files = (sum(counts) for counts in zip(*(other.committed for other in outcomes)))
            raise FeaturesInterrupted(self.partial, rows, files) from error
        return [other.value for other in outcomes]

    def run(
        self, inputs: Sequence[str | os.PathLike], model: str | os.PathLike, log: Callable[[str], None]
    ) -> FeatureRun:
        files = self.together(lambda: self.claim_and_list(inputs) if self.main else None)[0]
        mine = process_slice(files, self.rank, self.processes)
        settings = self.together(lambda: self.load(model))
        check_same_numbers(settings)
        if self.main:
            sizes = sorted({len(process_slice(files, rank, self.processes)) for rank in range(self.processes)})
            log(f"precision: {self.setup.precision}")
            log(
                f"{self.processes} processes ({self.state.distributed_type.value}), "
                f"{' or '.join(map(str, sizes))} of {len(files)} input file(s) each"
            )
        self.together(lambda: self.open_shards(settings[self.rank]))
        encoded = self.together(lambda: self.encode(mine), writing=True)
        if self.main:
            for skipped, _ in encoded[1:]:
                for message in skipped:
                    self.report(message)
        paths = self.together(lambda: self.merge(files, settings) if self.main else None)[0]
        return FeatureRun(
            self.output,
            len(paths),
            len(set(paths)),
            sum(resumed for _, resumed in encoded),
            [message for skipped, _ in encoded for message in skipped],
            str(self.setup.precision),
            self.processes,
        )

    def report(self, message: str) -> None:
        """Report an unreadable file (on process 0 only)."""
        if self.main:
            (self.options["on_skip"] or (lambda text: warnings.warn(f"skipped {text}", stacklevel=3)))(message)

    def claim_and_list(self, inputs: Sequence[str | os.PathLike]) -> list[str]:
        """(Process 0.) Check that the output may be written; the input files, in the 1-process order."""
        claim_output(self.output, overwrite=self.overwrite, processes=self.processes)
        return [str(path) for path in expand_inputs(inputs)]

    def load(self, model: str | os.PathLike) -> dict[str, Any]:
        """Load this process's encoder; its settings, with its place in the launch."""
        names = ("pooling", "frame_stride", "slice_stride", "axis", "dtype")
        self.setup = load_for_features(model, device=self.device, **{name: self.options[name] for name in names})
        return {**self.setup.settings, "process": self.rank, "processes": self.processes}

    def open_shards(self, settings: dict[str, Any]) -> None:
        """Open (or resume) this process's shard directory."""
        self.shards = Shards(rank_directory(self.partial, self.rank, self.processes), settings)
        if self.main and self.overwrite:
            atomic_write_text(self.partial / REPLACES_OUTPUT, "")

    def encode(self, files: list[str]) -> tuple[list[str], int]:
        """Encode this process's slice; its unreadable files' lines and how many of its files were resumed."""
        resumed = sum(path in self.shards.frames or path in self.shards.complete for path in files)
        skipped = encode_files(
            files,
            self.setup,
            self.shards,
            batch_size=self.options["batch_size"],
            progress=self.options["progress"] and self.main,
            report=self.report,
            checkpoint_rows=self.options["checkpoint_rows"],
            checkpoint_seconds=self.options["checkpoint_seconds"],
        )
        return skipped, resumed

    def merge(self, files: list[str], settings: list[dict[str, Any]]) -> list[str]:
        """(Process 0.) Write every process's rows, slices in order, to the output; the row paths."""
        parts = []
        for rank in range(self.processes):
            shards = Shards(rank_directory(self.partial, rank, self.processes), settings[rank])
            parts.append(shards.rows(process_slice(files, rank, self.processes)))
        return write_output(self.output, self.partial, parts, self.setup, len(files), processes=self.processes)


def check_same_numbers(settings: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a run whose processes would compute different numbers (precisions, model configs, processors).

    Model paths and weight-file dates are not compared: nodes may each have their own copy of the model.

    Raises:
        UsfmaeError: naming the first process that differs from process 0, and how.
    """

    def numbers(setting: Mapping[str, Any]) -> dict[str, Any]:
        kept = {key: value for key, value in setting.items() if key not in ("model", "model_files", "process")}
        return {**kept, "config": setting["model_files"].get("config.json")}

    first = numbers(settings[0])
    for rank, setting in enumerate(settings[1:], start=1):
        other = numbers(setting)
        differ = [key for key in sorted(first.keys() | other.keys()) if first.get(key) != other.get(key)]
        if differ:
            shown = "; ".join(f"{key} {first.get(key)} vs {other.get(key)}" for key in differ)
            raise UsfmaeError(
                f"process {rank} would compute other numbers than process 0 ({shown[:300]}): give every process "
                "the same model directory and an explicit --dtype"
            )
