"""``usfmae features`` on 2 processes (CPUs over gloo) writes the rows of 1 process; each process resumes alone."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from ports import free_port

from usfmae_hf.cli import main
from usfmae_hf.commands.features import resume_command
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.inference.distributed_features import (
    OtherProcessFailed,
    _Outcome,
    _Run,
    check_same_numbers,
    process_slice,
)
from usfmae_hf.inference.feature_files import FeaturesInterrupted

REPO = Path(__file__).resolve().parents[1]
FILES = 12
# 3 divides both 12 (one process) and 6 (each of two): every batch holds the same images in both runs.
BATCH = "3"


def read(path: Path) -> tuple[list[str], list[int], np.ndarray, dict]:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"usfmae"])
    columns = table.to_pydict()
    return columns["path"], columns["frame"], np.array(columns["features"], dtype=np.float32), meta


def arguments(scans: Path, model: Path, output: Path, *extra: str) -> list[str]:
    return [
        str(scans),
        "--model",
        str(model),
        "--output",
        str(output),
        "--dtype",
        "fp32",
        "--batch-size",
        BATCH,
        *extra,
    ]


def environment(**extra: str) -> dict[str, str]:
    # one thread per process, as in the 1-process reference: the same kernels give the same bits
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    for index in range(FILES):
        Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(folder / f"img{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def reference(scans, tiny_model_dir, tmp_path_factory) -> Path:
    """The 1-process run, on one thread."""
    output = tmp_path_factory.mktemp("one") / "features.parquet"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["features", *arguments(scans, tiny_model_dir, output, "-q")]) == 0
    finally:
        torch.set_num_threads(threads)
    return output


# ---------------------------------------------------------------- in one process


def test_slices_are_contiguous_and_balanced():
    files = [f"f{i}" for i in range(7)]
    for processes in (1, 2, 3, 7, 9):
        slices = [process_slice(files, rank, processes) for rank in range(processes)]
        assert [name for part in slices for name in part] == files
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_what_several_processes_cannot_do_fails_before_they_start(scans, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # no process group starts: these are refused first
    assert main(["features", *arguments(scans, tiny_model_dir, tmp_path / "f.npy")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"usfmae features: error: {tmp_path / 'f.npy'}: " + (
        "several processes write one Parquet file: name the output FILE.parquet"
    )
    assert main(["features", *arguments(scans, tiny_model_dir, tmp_path / "f.parquet", "--device", "cpu:0")]) == 2
    assert "each one uses its own device; pass --device cpu or leave --device out" in capsys.readouterr().err


def test_one_process_refuses_the_partial_run_of_several_and_overwrite_discards_it(
    scans, tiny_model_dir, tmp_path, capsys
):
    output = tmp_path / "f.parquet"
    (tmp_path / "f.parquet.partial" / "rank-00003-of-00004").mkdir(parents=True)
    assert main(["features", *arguments(scans, tiny_model_dir, output, "-q")]) == 2
    error = capsys.readouterr().err
    assert f"{output}.partial holds an interrupted 4-process run: rerun it on 4 processes, or pass --overwrite" in error
    assert main(["features", *arguments(scans, tiny_model_dir, output, "-q", "--overwrite")]) == 0
    assert not (tmp_path / "f.parquet.partial").exists()


def test_a_launch_that_starts_one_process_is_warned_about(scans, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASTER_PORT", "29500")  # as `accelerate launch --cpu --num_processes 2` leaves it
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["features", *arguments(scans, tiny_model_dir, tmp_path / "f.parquet", "-q")]) == 0
    assert "warning: a launcher asked for several processes (MASTER_PORT is set without" in capsys.readouterr().err


def test_processes_that_would_compute_other_numbers_are_refused():
    base = {"model": "/a", "model_files": {"config.json": "sha256 1", "model.safetensors": "1 bytes, modified 1 ns"}}
    same_elsewhere = {
        "model": "/b",
        "model_files": {"config.json": "sha256 1", "model.safetensors": "1 bytes, modified 2 ns"},
    }
    check_same_numbers([{**base, "dtype": "fp32", "process": 0}, {**same_elsewhere, "dtype": "fp32", "process": 1}])
    with pytest.raises(
        UsfmaeError, match=r"process 1 would compute other numbers than process 0 \(dtype bf16 vs fp32\)"
    ):
        check_same_numbers([{**base, "dtype": "bf16"}, {**base, "dtype": "fp32"}])
    with pytest.raises(UsfmaeError, match=r"\(config sha256 1 vs sha256 2\)"):
        check_same_numbers([base, {**base, "model_files": {"config.json": "sha256 2"}}])


def test_a_step_fails_or_is_interrupted_on_every_process_together(tmp_path, monkeypatch):
    """What process 0 does when process 1 sends a failure or an interruption (the gather is faked)."""
    state = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, device=torch.device("cpu"))
    run = _Run(state, tmp_path / "f.parquet", {"overwrite": False})
    run.shards = SimpleNamespace(row_count=5, complete={"a", "b"})
    other = {}
    monkeypatch.setattr("accelerate.utils.gather_object", lambda objects: [*objects, other["outcome"]])

    other["outcome"] = _Outcome(value="theirs")
    assert run.together(lambda: "mine") == ["mine", "theirs"]
    other["outcome"] = _Outcome(failure="model: not a model directory")
    with pytest.raises(OtherProcessFailed, match="^process 1 of 2 failed: model: not a model directory$"):
        run.together(lambda: "mine")
    with pytest.raises(ValueError, match="mine"):  # a process that failed raises its own error
        run.together(lambda: (_ for _ in ()).throw(ValueError("mine")))
    other["outcome"] = _Outcome(interrupted=True, committed=(3, 1))
    with pytest.raises(FeaturesInterrupted) as interrupted:
        run.together(lambda: "mine", writing=True)
    assert (interrupted.value.partial, interrupted.value.rows, interrupted.value.files) == (run.partial, 8, 3)
    with pytest.raises(KeyboardInterrupt):
        run.together(lambda: "mine")


def test_the_resume_command_of_several_processes_launches_as_many():
    args = SimpleNamespace(
        inputs=["scans"], model="m", output="f.parquet", pooling="cls", batch_size=4, frame_stride=1,
        slice_stride=1, axis=0, dtype="fp32", device=None, quiet=True,
    )  # fmt: skip
    assert resume_command(args, 2).startswith(
        "accelerate launch --multi_gpu --num_processes 2 -m usfmae_hf.commands.features scans --model m"
    )
    assert resume_command(args).startswith("usfmae features scans --model m")


def test_the_module_runs_as_the_command(scans, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``python -m usfmae_hf.commands.features ARGS`` (what the launchers run) is ``usfmae features ARGS``."""
    output = tmp_path / "f.parquet"
    monkeypatch.setattr(sys, "argv", ["features.py", *arguments(scans, tiny_model_dir, output, "-q")])
    monkeypatch.delitem(sys.modules, "usfmae_hf.commands.features")  # as in a fresh interpreter
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("usfmae_hf.commands.features", run_name="__main__")
    assert exited.value.code == 0 and output.is_file()
    assert f"wrote {FILES} feature rows from {FILES} file(s) to {output}" in capsys.readouterr().out


# ---------------------------------------------------------------- 2 processes over gloo

# Counts the images each process encodes; interrupts process STOP_RANK when it opens its 4th file (as
# Ctrl-C would); commits every 3 rows, so that every batch of the interrupted and the resumed run holds
# the same images as in one process.
DRIVER = """
import functools, os, sys
import usfmae_hf.inference.distributed_features as distributed
import usfmae_hf.inference.feature_files as feature_files
rank = os.environ["RANK"]
real_load_frames, real_extract = feature_files.load_frames, feature_files.extract_features
opened = []
def load_frames(path, **kwargs):
    opened.append(path)
    if os.environ.get("STOP_RANK") == rank and len(opened) == 4:
        raise KeyboardInterrupt
    return real_load_frames(path, **kwargs)
def extract_features(encoder, images, *args, **kwargs):
    with open(os.path.join(os.environ["CALLS"], "rank" + rank), "a") as calls:
        calls.write(f"{len(images)}\\n")
    return real_extract(encoder, images, *args, **kwargs)
feature_files.load_frames, feature_files.extract_features = load_frames, extract_features
distributed.write_features_distributed = functools.partial(
    distributed.write_features_distributed, checkpoint_rows=3, checkpoint_seconds=1e9
)
from usfmae_hf.commands.features import main
sys.exit(main())
"""


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one_process_and_resume_each_from_its_shards(
    scans, tiny_model_dir, reference, tmp_path, capsys
):
    """torchrun, one process interrupted; then accelerate launch (CPU-only machine, no flag) resumes it.

    Rows bitwise equal to one process: the same images in every batch, one thread per process.
    """
    output = tmp_path / "features.parquet"
    partial = tmp_path / "features.parquet.partial"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    features = [str(driver), *arguments(scans, tiny_model_dir, output)]

    def launch(launcher: list[str], calls: Path, **extra: str) -> subprocess.CompletedProcess:
        calls.mkdir()
        env = environment(CALLS=str(calls), **extra)
        return subprocess.run([sys.executable, "-m", *launcher], env=env, capture_output=True, text=True, timeout=300)

    def encoded(calls: Path) -> tuple[int, int]:
        paths = [calls / f"rank{rank}" for rank in (0, 1)]
        return tuple(sum(map(int, path.read_text().split())) if path.exists() else 0 for path in paths)

    torchrun = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    first = launch([*torchrun, *features], tmp_path / "calls1", STOP_RANK="1")
    assert first.returncode != 0 and not output.exists()
    (message,) = [line for line in first.stderr.splitlines() if "to resume" in line]  # process 0 only
    assert "interrupted; 9 finished row(s) (8 file(s) complete) are saved in" in message
    assert message.endswith(
        "to resume, re-run the same command on 2 processes: accelerate launch --multi_gpu --num_processes 2 "
        f"-m usfmae_hf.commands.features {scans} --model {tiny_model_dir} --output {output} --pooling cls "
        "--batch-size 3 --frame-stride 1 --slice-stride 1 --axis 0 --dtype fp32"
    )
    assert encoded(tmp_path / "calls1") == (6, 3)  # process 1 stopped at the 4th of its 6 files
    settings = json.loads((partial / "rank-00001-of-00002" / "settings.json").read_text())
    assert (settings["process"], settings["processes"], settings["dtype"]) == (1, 2, "fp32")

    # one process may not take over, or silently discard, the shards of two
    assert main(["features", *arguments(scans, tiny_model_dir, output, "-q")]) == 2
    assert "holds an interrupted 2-process run: rerun it on 2 processes" in capsys.readouterr().err

    accelerate = [
        "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    second = launch([*accelerate, *features], tmp_path / "calls2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert encoded(tmp_path / "calls2") == (0, 3)  # process 0 had finished its slice; process 1 does its last 3
    lines = second.stdout.splitlines()  # process 0 only
    assert lines.count("precision: fp32 (requested)") == 1
    assert lines.count(f"2 processes (MULTI_CPU), 6 of {FILES} input file(s) each") == 1
    summary = f"wrote {FILES} feature rows from {FILES} file(s) (9 resumed from an interrupted run) to {output}"
    assert lines.count(f"{summary} by 2 processes") == 1
    assert not partial.exists()

    paths, frames, rows, meta = read(output)
    one_paths, one_frames, one_rows, one_meta = read(reference)
    assert paths == one_paths == [str(scans / f"img{i:02d}.png") for i in range(FILES)]
    assert frames == one_frames
    assert np.array_equal(rows, one_rows)
    assert meta == {**one_meta, "processes": 2}
    assert pq.read_schema(output).remove_metadata() == pq.read_schema(reference).remove_metadata()

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(output), split="train", cache_dir=str(tmp_path / "c"))
    assert loaded["path"] == one_paths
    assert np.array_equal(np.array(loaded["features"], dtype=np.float32), one_rows)
