"""Crash-safe conversion: a run killed at any step leaves the old or the new output, and the next run cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_MAE_KWARGS
from safetensors.torch import load_file

from usfmae_hf.cli import main
from usfmae_hf.errors import CheckpointError, OutputExistsError
from usfmae_hf.model.conversion import convert_checkpoint, export_original, recover_interrupted_output
from usfmae_hf.model.reference_mae import ReferenceMAE

HEADS = dict(num_attention_heads=2, decoder_num_attention_heads=2)
OLD_MARKER = "old.txt"

# Runs one conversion (or export) in a fresh interpreter and SIGKILLs it at the named step: nothing of
# Python's cleanup (finally, except, atexit) runs, as when the machine or the job scheduler kills it.
KILLED_RUN = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    import torch
    from usfmae_hf import atomic
    from usfmae_hf.model import conversion

    step, source, output = sys.argv[1:4]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if step == "while_staging":  # half of the new weights written
        def half_written(state_dict, path, **kwargs):
            pathlib.Path(path).write_bytes(b"half")
            die()
        conversion.save_legacy_safetensors = half_written
    elif step == "between_renames":  # the old output moved aside, the new one not yet in place
        rename = pathlib.Path.rename
        def rename_then_die(self, target):
            result = rename(self, target)
            if str(target).endswith(".old"):
                die()
            return result
        pathlib.Path.rename = rename_then_die
    elif step == "before_old_deleted":  # the new output in place, the old one not yet deleted
        remove = atomic._remove
        atomic._remove = lambda path: die() if path.name.endswith(".old") else remove(path)
    elif step == "export_while_writing":
        def half_saved(obj, handle):
            handle.write(b"half")
            handle.flush()
            die()
        torch.save = half_saved

    if step.startswith("export"):
        conversion.export_original(source, output, overwrite=True)
    else:
        conversion.convert_checkpoint(
            source, output, overwrite=True, verify=False, num_attention_heads=2, decoder_num_attention_heads=2
        )
    """
)


def _run_killed(step: str, source: Path, output: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, step, str(source), str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def _old_output(checkpoint: Path, output: Path) -> None:
    convert_checkpoint(checkpoint, output, verify=False, **HEADS)
    (output / OLD_MARKER).write_text("the output of an earlier run")


def _version(output: Path) -> str:
    """``"old"``, ``"new"`` (a complete, loadable conversion) or ``"missing"``."""
    if not output.exists():
        return "missing"
    if (output / OLD_MARKER).exists():
        return "old"
    assert load_file(output / "model.safetensors") and (output / "config.json").is_file()
    assert (output / "README.md").is_file() and (output / "preprocessor_config.json").is_file()
    return "new"


def _siblings(output: Path) -> list[str]:
    return sorted(path.name for path in output.parent.iterdir())


@pytest.mark.parametrize(
    ("step", "after_kill", "after_restart"),
    [
        ("while_staging", "old", "old"),
        ("between_renames", "missing", "old"),  # the old output waits beside it, renamed back on restart
        ("before_old_deleted", "new", "new"),
    ],
)
def test_killed_overwrite_leaves_old_or_new_output(tiny_original_checkpoint, tmp_path, step, after_kill, after_restart):
    output = tmp_path / "out"
    _old_output(tiny_original_checkpoint, output)
    _run_killed(step, tiny_original_checkpoint, output)
    assert _version(output) == after_kill
    assert len(_siblings(output)) > 1  # the killed run left its staging or the old copy behind

    # The next run first recovers and cleans up, then refuses to overwrite without --overwrite.
    with pytest.raises(OutputExistsError):
        convert_checkpoint(tiny_original_checkpoint, output, **HEADS)
    assert _version(output) == after_restart
    assert _siblings(output) == ["out"]
    convert_checkpoint(tiny_original_checkpoint, output, overwrite=True, **HEADS)
    assert _version(output) == "new" and _siblings(output) == ["out"]


def test_killed_export_keeps_the_old_file(tiny_model_dir, tmp_path):
    output = tmp_path / "back.pth"
    export_original(tiny_model_dir, output)
    before = output.read_bytes()
    _run_killed("export_while_writing", tiny_model_dir, output)
    assert output.read_bytes() == before
    assert len(_siblings(output)) == 2  # the half-written temporary file
    export_original(tiny_model_dir, output, overwrite=True)
    assert output.read_bytes() == before and _siblings(output) == ["back.pth"]


def test_system_exit_between_renames_is_recovered(tiny_original_checkpoint, tmp_path, monkeypatch):
    """An exception (here SystemExit) right after the old output was moved aside loses neither version."""
    output = tmp_path / "out"
    _old_output(tiny_original_checkpoint, output)
    rename = Path.rename

    def rename_then_exit(self, target):
        result = rename(self, target)
        if str(target).endswith(".old"):
            raise SystemExit(1)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", rename_then_exit)
        with pytest.raises(SystemExit):
            convert_checkpoint(tiny_original_checkpoint, output, overwrite=True, verify=False, **HEADS)
    recover_interrupted_output(output)
    assert _version(output) == "old" and _siblings(output) == ["out"]


def test_only_leftovers_named_by_the_package_are_removed(tiny_original_checkpoint, tmp_path):
    output = tmp_path / "out"
    _old_output(tiny_original_checkpoint, output)
    ours = [".out.k3j_9x0a.tmp", ".out.abcdefgh.old", ".out.12345678.tmp"]
    theirs = [".out.keep", ".out.short.tmp", ".out.ABCDEFGH.tmp", ".other.abcdefgh.tmp", "out.abcdefgh.tmp"]
    for index, name in enumerate(ours + theirs):
        if index % 2:
            (tmp_path / name).write_text("x")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "file").write_text("x")
    convert_checkpoint(tiny_original_checkpoint, output, overwrite=True, verify=False, **HEADS)
    assert _siblings(output) == sorted(["out", *theirs])
    assert _version(output) == "new"


def test_one_channel_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    """The bundled processor feeds RGB (as USF-MAE), so a grey-input patch embedding could never run on it."""
    torch.manual_seed(0)
    source = tmp_path / "grey.pth"
    torch.save(ReferenceMAE.from_hf_config_kwargs({**TINY_MAE_KWARGS, "num_channels": 1}).state_dict(), source)
    with pytest.raises(CheckpointError, match="1-channel input") as info:
        convert_checkpoint(source, tmp_path / "out", **HEADS)
    assert "\n" not in str(info.value) and str(source) in str(info.value)
    assert _siblings(tmp_path / "out") == ["grey.pth"]

    heads = ["--num-attention-heads", "2", "--decoder-num-attention-heads", "2"]
    assert main(["convert", str(source), "-o", str(tmp_path / "out"), *heads]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "1-channel input" in errors[0]
    assert _siblings(tmp_path / "out") == ["grey.pth"]
