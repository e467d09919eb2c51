"""One failure path for every command and script: one stderr line, the right exit status, no traceback."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import usfmae_hf.evaluation.leakage
from usfmae_hf.cli import main
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.failures import traceback_path
from usfmae_hf.launch import run_from_command_line


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("USFMAE_DEBUG", raising=False)


def _run_cli(*args):
    env = {key: value for key, value in os.environ.items() if key != "USFMAE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "usfmae_hf.cli", *map(str, args)], capture_output=True, text=True, env=env
    )


def _argparse_error(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("ratio", ["0", "1", "nan", "-0.5", "1.5", "inf", "half"])
def test_reconstruct_mask_ratio_outside_open_unit_interval(capsys, tmp_path, ratio):
    argv = ["reconstruct", "x.png", "-m", str(tmp_path), "-o", str(tmp_path / "o.png"), "--mask-ratio", ratio]
    _argparse_error(capsys, argv, "--mask-ratio")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["features", "x.png", "-m", "m", "-o", "o.parquet", "--frame-stride", "0"], "--frame-stride"),
        (["features", "x.png", "-m", "m", "-o", "o.parquet", "--slice-stride", "0"], "--slice-stride"),
        (["features", "x.png", "-m", "m", "-o", "o.parquet", "--batch-size", "0"], "--batch-size"),
        (["features", "x.png", "-m", "m", "-o", "o.parquet", "--batch-size", "-3"], "--batch-size"),
        (["ingest", "in", "--output", "out", "--frame-stride", "0"], "--frame-stride"),
        (["ingest", "in", "--output", "out", "--slice-stride", "0"], "--slice-stride"),
        (["features", "x.png", "-m", "m", "-o", "o.parquet", "--device", "banana"], "not a torch device"),
    ],
)
def test_bad_numbers_and_devices_are_argparse_errors(capsys, argv, flag):
    _argparse_error(capsys, argv, flag)


def test_probe_batch_size_and_device(capsys):
    from usfmae_hf.commands import positive_int, torch_device

    with pytest.raises(Exception, match="positive"):
        positive_int("0")
    with pytest.raises(Exception, match="not a torch device"):
        torch_device("banana")
    assert torch_device("cpu") == "cpu"


def test_cuda_without_a_gpu_is_an_argparse_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _argparse_error(capsys, ["features", "x.png", "-m", "m", "-o", "o.parquet", "--device", "cuda"], "no CUDA GPU")


def _leakage_raises(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(usfmae_hf.evaluation.leakage, "find_shared_images", fail)


@pytest.mark.parametrize(
    "error, expected",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/locked.png"), "permission denied: /data/locked.png"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/gone"), "no such file or directory"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/f.parquet"), "no space left on device while"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "read-only file system: /ro/out"),
        (MemoryError(), "out of memory"),
        (UsfmaeError("first line\nsecond line"), "first line second line"),
    ],
)
def test_expected_failures_are_one_line(capsys, monkeypatch, error, expected):
    _leakage_raises(monkeypatch, error)
    assert main(["leakage-check", "a", "--against", "b"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith("usfmae leakage-check: error: ") and expected in err, err


def test_unexpected_error_is_one_line_with_a_traceback_file(capsys, monkeypatch):
    _leakage_raises(monkeypatch, RuntimeError("the widget broke"))
    assert main(["leakage-check", "a", "--against", "b"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "RuntimeError: the widget broke" in err and traceback_path() in err
    written = Path(traceback_path()).read_text()
    assert "Traceback" in written and "the widget broke" in written and "find_shared_images" not in err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(capsys, monkeypatch, how):
    _leakage_raises(monkeypatch, RuntimeError("the widget broke"))
    argv = ["leakage-check", "a", "--against", "b"]
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("USFMAE_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: the widget broke" in err


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    _leakage_raises(monkeypatch, KeyboardInterrupt())
    assert main(["leakage-check", "a", "--against", "b"]) == 130
    assert capsys.readouterr().err.strip() == "usfmae leakage-check: interrupted"


def test_real_command_line_one_line_errors(tmp_path):
    result = _run_cli("leakage-check", tmp_path / "missing", "--against", tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    result = _run_cli("reconstruct", "x.png", "-m", tmp_path, "-o", tmp_path / "o.png", "--mask-ratio", "nan")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("usfmae reconstruct: error: argument --mask-ratio")


def test_failures_module_imports_nothing_heavy():
    code = "import sys, usfmae_hf.failures; print(sorted({'torch', 'numpy', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@dataclasses.dataclass
class _Arguments:
    steps: int = 1


@pytest.mark.parametrize(
    "error, status, expected",
    [
        (UsfmaeError("bad data"), 2, "train: error: bad data"),
        (OSError(errno.ENOSPC, "No space left on device", "/ckpt"), 2, "no space left on device"),
        (RuntimeError("boom"), 1, "RuntimeError: boom"),
        (KeyboardInterrupt(), 130, "train: interrupted"),
    ],
)
def test_training_scripts_share_the_failure_path(capsys, error, status, expected):
    def run(arguments):
        assert arguments.steps == 3
        raise error

    assert run_from_command_line([_Arguments], run, prog="train", description="d", argv=["--steps", "3"]) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err


def test_training_scripts_succeed_with_status_0():
    assert run_from_command_line([_Arguments], lambda arguments: {}, prog="train", description="d", argv=[]) == 0
