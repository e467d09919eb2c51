"""``usfmae pretrain|finetune|finetune-segmentation`` and ``python -m`` run the training scripts' code.

Each command is compared with the repository's ``training/*.py`` script run on the same flags: same
help, same losses step by step (the flags reach the training code untouched, ``TrainingArguments``
included), and ``accelerate launch -m usfmae_hf.pretraining`` on 2 CPU processes over gloo equals one
process with the same global batch.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ports import free_port
from synthetic_segmentation import write_generic

from usfmae_hf import cli
from usfmae_hf.failures import DEBUG_ENVIRONMENT_VARIABLE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "pretrain": REPO / "training" / "pretrain_mae.py",
    "finetune": REPO / "training" / "finetune_classification.py",
    "finetune-segmentation": REPO / "training" / "finetune_segmentation.py",
}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(8):
        Image.fromarray(rng.integers(0, 256, size=(40, 36 + index, 3), dtype=np.uint8)).save(directory / f"{index}.png")
    return directory


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    """``train/`` and ``validation/`` with two classes of 4 random grey images each."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(1)
    for split in ("train", "validation"):
        for name in ("benign", "malignant"):
            (root / split / name).mkdir(parents=True)
            for index in range(4):
                pixels = rng.integers(0, 256, size=(40, 48), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / name / f"{index}.png")
    return root


def _flags(command: str, model: Path, data: Path, output: Path, batch: int = 4) -> list[str]:
    """Two optimizer steps of the command on the tiny model, with flags of every argument dataclass."""
    if command == "pretrain":
        return ["--model_name_or_path", str(model), "--train_dir", str(data), "--output_dir", str(output),
                "--max_steps", "2", "--per_device_train_batch_size", str(batch), "--base_learning_rate", "1e-2",
                "--mixed_precision", "no", "--dataloader_num_workers", "0", "--num_reconstruction_images", "1",
                "--seed", "5"]  # fmt: skip
    return ["--model_name_or_path", str(model), "--train_dir", str(data / "train"),
            "--validation_dir", str(data / "validation"), "--output_dir", str(output), "--max_steps", "2",
            "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3", "--logging_steps", "1",
            "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--augment", "none", "--seed", "5"]  # fmt: skip


def _losses(command: str, output: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged optimizer step, read from the run's own log."""
    if command == "pretrain":
        records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    else:
        records = [r for r in json.loads((output / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    return [(record["step"], record["loss"]) for record in records]


def _run_script(script: Path, argv: list[str], monkeypatch) -> int:
    """Run ``script`` as ``python script ARGV`` would, in this process; return its exit status."""
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    return exited.value.code


def _exit_status(call) -> int:
    """What ``call()`` returned, or the status it exited with (argparse exits after ``--help``)."""
    try:
        return call()
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("command", SCRIPTS)
def test_help_is_the_scripts_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width
    assert _exit_status(lambda: cli.main([command, "--help"])) == 0
    mine = capsys.readouterr().out
    assert _run_script(SCRIPTS[command], ["--help"], monkeypatch) == 0
    script = capsys.readouterr().out
    # the scripts pass their docstring as the description; usage and every option must be the same
    assert mine.split("\n\n")[0] == script.split("\n\n")[0]
    assert mine.partition("\noptions:")[2] == script.partition("\noptions:")[2]
    for flag in ("--output_dir", "--max_steps", "--model_name_or_path", "--seed"):
        assert flag in mine


@pytest.mark.parametrize("command", SCRIPTS)
def test_command_trains_exactly_as_the_script(command, tiny_model_dir, image_dir, class_folders, tmp_path, monkeypatch):
    if command == "finetune-segmentation":
        data = write_generic(tmp_path / "masks", 8, 4, size=32, seed=0)
    else:
        data = image_dir if command == "pretrain" else class_folders
    by_command, by_script = tmp_path / "command", tmp_path / "script"
    assert cli.main([command, *_flags(command, tiny_model_dir, data, by_command)]) == 0
    assert _run_script(SCRIPTS[command], _flags(command, tiny_model_dir, data, by_script), monkeypatch) == 0
    losses = _losses(command, by_command)
    assert [step for step, _ in losses] == [1, 2]  # --max_steps 2 and --output_dir reached the run
    assert losses == _losses(command, by_script)  # bit-identical: CPU, fp32, same seed, one process


def test_debug_flag_reaches_the_training_failure_report(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENVIRONMENT_VARIABLE, raising=False)  # restored after the test either way
    missing = tmp_path / "no-such-folder"
    argv = ["--config_name", str(tmp_path / "no-config.json"), "--train_dir", str(missing), "--output_dir", "x"]
    assert cli.main(["pretrain", *argv]) == 2
    quiet = capsys.readouterr().err
    assert quiet.startswith("pretrain_mae: error:") and "Traceback" not in quiet
    assert cli.main(["--debug", "pretrain", *argv]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert DEBUG_ENVIRONMENT_VARIABLE not in os.environ  # for that run only
    assert cli.main(["pretrain", *argv]) == 2 and "Traceback" not in capsys.readouterr().err


def test_python_dash_m_finetuning_is_the_classification_script():
    result = subprocess.run(
        [sys.executable, "-m", "usfmae_hf.finetuning", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: finetune_classification") and "--head {cls,mean}" in result.stdout


@pytest.mark.slow
def test_accelerate_launch_module_on_two_processes_equals_one(tiny_model_dir, image_dir, tmp_path):
    """2 processes x batch 2 (accelerate launch -m) == 1 process x batch 2 x accumulation 2, within 1e-5."""
    two, one = tmp_path / "two", tmp_path / "one"
    flags = _flags("pretrain", tiny_model_dir, image_dir, two, batch=2)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--main_process_port", str(free_port())]  # fmt: skip
    result = subprocess.run(
        [*launch, "-m", "usfmae_hf.pretraining", *flags], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    single = _flags("pretrain", tiny_model_dir, image_dir, one, batch=2)
    assert cli.main(["pretrain", *single, "--gradient_accumulation_steps", "2"]) == 0
    two_records, one_records = (
        [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] for out in (two, one)
    )
    assert [r["step"] for r in two_records] == [r["step"] for r in one_records] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in two_records], [r["loss"] for r in one_records], rtol=1e-5)
    # --recipe usfmae: lr = blr x 128 / 256 on any number of processes (MAE's scaling: tests/test_pretraining.py)
    assert [r["lr"] for r in two_records] == pytest.approx([r["lr"] for r in one_records])
    assert (two / "final" / "config.json").is_file()
