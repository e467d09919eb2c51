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


def _model_error(name: str, message: str) -> OSError:
    """What transformers raises for a model it cannot find: a bare OSError from a huggingface_hub error."""
    import huggingface_hub.errors

    try:
        raise getattr(huggingface_hub.errors, name)(message)
    except Exception as cause:
        try:
            raise OSError(f"transformers' own words: {message}") from cause
        except OSError as error:
            return error


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
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/out"), "is a folder, not a file: /out"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "/in/loop.png"), "symbolic link loop: /in/loop"),
        (FileExistsError(errno.EEXIST, "File exists", "/nowhere/x"), "already exists: /nowhere/x"),
        (
            _model_error("HFValidationError", "Repo id must be ... 'namespace/repo_name': '/models/gone'."),
            "/models/gone: no such model folder, and not a valid Hub model id (check the path)",
        ),
        (_model_error("LocalEntryNotFoundError", "offline"), "not in the Hub cache (offline"),
    ],
)
def test_expected_failures_are_one_line(capsys, monkeypatch, error, expected):
    _leakage_raises(monkeypatch, error)
    assert main(["leakage-check", "a", "--against", "b"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith("usfmae leakage-check: error: ") and expected in err, err


@pytest.mark.parametrize("kind", ["file", "parent"])
def test_a_file_where_a_folder_should_be_is_named(capsys, monkeypatch, tmp_path, kind):
    (tmp_path / "file").write_text("in the way")
    target = tmp_path / "file" / "out" / "x.parquet"
    error = FileExistsError if kind == "file" else NotADirectoryError
    _leakage_raises(
        monkeypatch, error(errno.EEXIST, "File exists", str(tmp_path / "file" if kind == "file" else target))
    )
    assert main(["leakage-check", "a", "--against", "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"usfmae leakage-check: error: {tmp_path / 'file'} is a file, not a folder"), err
    assert (f"cannot create {target}" in err) is (kind == "parent")


def test_a_closed_output_pipe_ends_silently(capsys, monkeypatch):
    _leakage_raises(monkeypatch, BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert main(["leakage-check", "a", "--against", "b"]) == 141
    assert capsys.readouterr().err == ""


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


def test_training_script_argument_errors_are_one_line(capsys):
    @dataclasses.dataclass
    class Required:
        model_name_or_path: str = dataclasses.field(metadata={"help": "the model"})

    with pytest.raises(SystemExit) as exited:
        run_from_command_line([Required], lambda arguments: None, prog="train", description="d", argv=[])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "train: error: the following arguments are required: --model_name_or_path/--model-name-or-path "
        "(--help lists the options)"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["features"],
        ["datasets"],
        ["datasets", "show"],
        ["nonsense"],
        ["reconstruct", "x", "-m", "m", "-o", "o", "-q", "-v"],
    ],
)
def test_command_line_mistakes_are_one_line_without_usage(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and "usage:" not in err, err
    assert err.startswith("usfmae") and ": error: " in err and err.rstrip().endswith("(--help lists the options)")


def test_help_still_shows_the_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["features", "--help"])
    assert exited.value.code == 0 and "usage: usfmae features" in capsys.readouterr().out


def test_every_command_takes_quiet_and_verbose():
    from usfmae_hf.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.dest == "command"]
    leaves = []
    for name, sub in commands.choices.items():
        nested = [action for action in sub._actions if action.dest == "action"]
        leaves += [(f"{name} {n}", s) for n, s in nested[0].choices.items()] if nested else [(name, sub)]
    for name, sub in leaves:
        flags = {flag for action in sub._actions for flag in action.option_strings}
        if sub.prefix_chars == "-":
            assert {"-q", "--quiet", "-v", "--verbose"} <= flags, name
        else:  # the training commands hand every argument to the training script
            assert name in ("pretrain", "finetune", "finetune-segmentation"), name


def _features_run(tiny_model_dir, tmp_path, *flags):
    from PIL import Image

    Image.new("L", (40, 48), 90).save(tmp_path / "scan.png")
    return _run_cli("features", tmp_path / "scan.png", "-m", tiny_model_dir, "-o", tmp_path / "f.parquet", *flags)


def test_quiet_features_prints_nothing_on_stderr(tiny_model_dir, tmp_path):
    """Not transformers' "Loading weights" bar (the libraries are imported inside the command), nor our own."""
    result = _features_run(tiny_model_dir, tmp_path, "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (tmp_path / "f.parquet").exists()


def test_verbose_shows_the_library_bars(tiny_model_dir, tmp_path):
    result = _features_run(tiny_model_dir, tmp_path, "-v")
    assert result.returncode == 0 and "Loading weights" in result.stderr, result.stderr


def test_quiet_in_process_after_the_libraries_are_imported(tiny_model_dir, tmp_path, capfd):
    """The libraries, already imported, are switched off for the command and back on afterwards."""
    import datasets
    import huggingface_hub.utils
    from PIL import Image
    from transformers.utils import logging as transformers_logging

    Image.new("L", (40, 48), 90).save(tmp_path / "scan.png")
    transformers_logging.enable_progress_bar()  # whatever earlier tests in this process did
    datasets_before = datasets.is_progress_bar_enabled()
    argv = ["features", str(tmp_path / "scan.png"), "-m", str(tiny_model_dir), "-o", str(tmp_path / "f.parquet"), "-q"]
    assert main(argv) == 0
    assert capfd.readouterr().err == ""
    assert main([*argv[:-1], "--overwrite"]) == 0  # hidden by default too; the command's own bar is shown
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "features: 100%" in err, err
    assert transformers_logging.is_progress_bar_enabled() and not huggingface_hub.utils.are_progress_bars_disabled()
    assert datasets.is_progress_bar_enabled() is datasets_before
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ


def test_library_progress_bars_leave_the_users_setting_alone(monkeypatch):
    import huggingface_hub.utils

    from usfmae_hf.launch import library_progress_bars

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user wants them
    with library_progress_bars(show=False):
        assert not huggingface_hub.utils.are_progress_bars_disabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    with library_progress_bars(show=False):
        assert huggingface_hub.utils.are_progress_bars_disabled()
    assert not huggingface_hub.utils.are_progress_bars_disabled()
