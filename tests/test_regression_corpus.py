"""The regression corpus of issue 13: every malformed input, run through the real command line.

Each row of :data:`CASES` builds its inputs in a folder of its own (no binary fixtures: checkpoints,
images, DICOMs and folder shapes are written by the test), runs one command line and checks:

* the exit status (2 for an expected failure);
* stderr: exactly the one ``PROG: error: ...`` line (successes: no line at all, unless the row says
  which deliberate lines to expect), naming what the row says, with no traceback and no advice to
  disable ``weights_only``. Lines are counted as a terminal shows them: a progress bar that erases
  itself (``\r``) leaves nothing, one left on screen is a line;
* nothing left behind: the row's folder and the working directory are as before (no partial output,
  no temporary files), no pickle ran (marker files), and no child process is left running.

Starting torch and transformers takes seconds, so the rows run in ONE child process, through
``usfmae_hf.cli.main`` (the function behind the ``usfmae`` console script; the training commands are
the same mains as ``training/*.py``), each with its own file-descriptor-level capture of stdout and
stderr. The rows marked ``real`` each run as their own ``python ...`` process in a new session
instead, which proves the path through the interpreter and finds leftover processes by session.
The child runs once per test session, shared by the xdist workers (a file lock guards it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_checkpoints import _RunsCode  # pickles as a call to `touch MARKER`

REPO = Path(__file__).resolve().parents[1]
HEADS = ["--num-attention-heads", "2", "--decoder-num-attention-heads", "2"]


@dataclass(frozen=True)
class Case:
    """One row: the command (``{case}``, ``{model}`` and ``{checkpoint}`` are filled in), what it must do."""

    id: str
    argv: tuple[str, ...]
    expect: str | None  # a phrase of the one error line; None: the command must succeed
    setup: str = "none"  # a key of SETUPS: what the row's folder holds before the run
    status: int = 2
    real: bool = False  # its own `python -m usfmae_hf.cli` (or `python training/...`) process
    program: tuple[str, ...] = ("-m", "usfmae_hf.cli")
    leading: str | None = None  # what the stderr lines printed deliberately before the error (or success) start with
    created: tuple[str, ...] = ()  # successes: what they write into the row's folder
    needs: str | None = None  # "no-gpu", "read-only": skipped where that cannot be arranged
    absent: tuple[str, ...] = ("PWNED",)  # files that must never appear (pickle markers)


FINETUNE_SCRIPT = (str(REPO / "training" / "finetune_classification.py"),)
PRETRAIN_SCRIPT = (str(REPO / "training" / "pretrain_mae.py"),)


def _convert(*extra: str, checkpoint: str = "{case}/ckpt.pth", output: str = "{case}/out") -> tuple[str, ...]:
    return ("convert", checkpoint, "--output", output, *HEADS, *extra)


def _features(
    *extra: str, inputs: str = "{case}/in", model: str = "{model}", output: str = "{case}/out.parquet"
) -> tuple[str, ...]:
    return ("features", inputs, "--model", model, "--output", output, *extra)


def _reconstruct(
    *extra: str, image: str = "{case}/in/good.png", model: str = "{model}", output: str = "{case}/out.png"
) -> tuple[str, ...]:
    return ("reconstruct", image, "--model", model, "--output", output, *extra)


def _finetune(*extra: str, model: str = "{model}") -> tuple[str, ...]:
    return ("finetune", "--model_name_or_path", model, "--train_dir", "{case}/train", "--output_dir", "{case}/run",
            "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", *extra)  # fmt: skip


def _missing_flag_cases() -> list[Case]:
    """Every ``usfmae`` sub-command with no arguments: the argparse error, in one line."""
    from usfmae_hf.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if hasattr(action, "choices") and action.dest == "command"]
    return [
        Case(f"missing-args-{name}", (name,), "required")
        for name, sub in commands.choices.items()
        if sub.prefix_chars != "\0"  # the training commands forward their arguments: rows of their own below
    ]


CASES: list[Case] = [
    # -- malformed checkpoints (usfmae convert) ---------------------------------------------------------
    Case("ckpt-integer-key", _convert(), "key 7 is not a string", "ckpt-integer-key"),
    Case("ckpt-0-dim-tensor", _convert(), "cls_token has shape ()", "ckpt-0-dim-tensor"),
    Case("ckpt-no-encoder-blocks", _convert(), "no encoder blocks", "ckpt-no-encoder-blocks"),
    Case("ckpt-no-decoder-blocks", _convert(), "no decoder blocks", "ckpt-no-decoder-blocks"),
    Case("ckpt-sparse-tensor", _convert(), "norm.weight is a sparse tensor", "ckpt-sparse-tensor"),
    Case("ckpt-int64-tensors", _convert(), "torch.int64", "ckpt-int64-tensors"),
    Case("ckpt-1-channel-patch-embed", _convert(), "1-channel input", "ckpt-1-channel"),
    Case("ckpt-truncated", _convert(), "truncated or corrupt", "ckpt-truncated"),
    Case("ckpt-empty-file", _convert(), "truncated or corrupt", "ckpt-empty"),
    Case("ckpt-legacy-protocol-4-runs-code", _convert(), "would import and run code", "ckpt-legacy-evil"),
    Case(
        "ckpt-legacy-protocol-4-runs-code-real", _convert(), "would import and run code", "ckpt-legacy-evil", real=True
    ),
    Case("ckpt-zip-runs-code", _convert(), "would import and run code", "ckpt-zip-evil"),
    Case("ckpt-fp16-converts", _convert("-q"), None, "ckpt-fp16", status=0, created=("out",)),
    Case("ckpt-missing-file", _convert(checkpoint="{case}/nothing.pth"), "{case}/nothing.pth: no such file"),
    # -- unreadable images, truncated PNG, lying DICOM --------------------------------------------------
    Case("image-not-an-image", _reconstruct(image="{case}/in/garbage.png"), "{case}/in/garbage.png", "images"),
    Case("image-truncated-png", _reconstruct(image="{case}/in/truncated.png"), "{case}/in/truncated.png", "images"),
    Case("image-no-such-file", _reconstruct(image="{case}/in/gone.png"), "{case}/in/gone.png", "images"),
    Case("dicom-lying-rows-columns", _reconstruct(image="{case}/in/lying.dcm"), "over the limit", "images"),
    Case("features-skips-bad-files", _features("-q"), None, "images", 0, leading="skipped ", created=("out.parquet",)),
    Case(
        "features-nothing-readable",
        _features("-q", inputs="{case}/in/garbage.png"),
        "no frame",
        "images",
        leading="skipped ",
    ),
    # -- folder shapes -----------------------------------------------------------------------------------
    Case(
        "features-dangling-and-looping-links",
        _features("-q", inputs="{case}/links"),
        None,
        "links",
        0,
        leading="skipped ",
        created=("out.parquet",),
    ),
    Case(
        "ingest-dangling-and-looping-links",
        ("ingest", "{case}/root", "-o", "{case}/build", "--resize", "16", "-q"),
        None,
        "ingest-links",
        0,
        created=("build",),
    ),
    Case(
        "finetune-empty-class-folders", _finetune(), "class folder(s) benign, malignant hold no images", "empty-classes"
    ),
    Case(
        "finetune-skip-unreadable-all-corrupt",
        _finetune("--skip_unreadable"),
        "none of the 4 train image(s) can be decoded",
        "corrupt-classes",
    ),
    # -- arguments ---------------------------------------------------------------------------------------
    Case("mask-ratio-1.0", _reconstruct("--mask-ratio", "1.0"), "argument --mask-ratio", "images"),
    Case("mask-ratio-negative", _reconstruct("--mask-ratio=-0.5"), "argument --mask-ratio", "images"),
    Case("mask-ratio-nan", _reconstruct("--mask-ratio", "nan"), "argument --mask-ratio", "images"),
    Case("frame-stride-0", _features("--frame-stride", "0"), "argument --frame-stride", "images"),
    Case("ingest-frame-stride-0", ("ingest", "{case}", "-o", "{case}/build", "--frame-stride", "0"), "--frame-stride"),
    Case("batch-size-0", _features("--batch-size", "0"), "argument --batch-size", "images"),
    Case("device-banana", _features("--device", "banana"), "not a torch device", "images"),
    Case("device-cuda-without-gpu", _features("--device", "cuda"), "no CUDA GPU", "images", needs="no-gpu"),
    Case("features-model-missing", _features(model="{case}/no-model"), "{case}/no-model", "images"),
    Case("reconstruct-model-missing", _reconstruct(model="{case}/no-model"), "{case}/no-model", "images"),
    Case("finetune-model-missing", _finetune(model="{case}/no-model"), "{case}/no-model", "classes"),
    Case(
        "pretrain-model-missing",
        (
            "pretrain",
            "--model_name_or_path",
            "{case}/no-model",
            "--train_dir",
            "{case}/in",
            "--output_dir",
            "{case}/run",
        ),
        "{case}/no-model",
        "images",
    ),
    Case("features-output-is-a-folder", _features(output="{case}/out.parquet"), "{case}/out.parquet", "output-folder"),
    Case("reconstruct-output-is-a-folder", _reconstruct(output="{case}/in"), "{case}/in", "images"),
    Case(
        "convert-read-only-output",
        _convert(checkpoint="{checkpoint}", output="{case}/ro/out"),
        "{case}/ro",
        "read-only",
        needs="read-only",
    ),
    Case(
        "features-read-only-output",
        _features(output="{case}/ro/f.parquet"),
        "{case}/ro",
        "read-only+images",
        needs="read-only",
    ),
    Case(
        "ingest-read-only-output",
        ("ingest", "{case}/in", "-o", "{case}/ro/build"),
        "{case}/ro",
        "read-only+images",
        needs="read-only",
    ),
    Case(
        "export-read-only-output",
        ("export-original", "{model}", "-o", "{case}/ro/x.pth"),
        "{case}/ro",
        "read-only",
        needs="read-only",
    ),
    Case(
        "convert-output-under-a-file",
        _convert(checkpoint="{checkpoint}", output="{case}/file/out"),
        "{case}/file",
        "file",
    ),
    Case("features-output-under-a-file", _features(output="{case}/file/f.parquet"), "{case}/file", "file+images"),
    Case(
        "ingest-output-under-a-file", ("ingest", "{case}/in", "-o", "{case}/file/build"), "{case}/file", "file+images"
    ),
    Case(
        "export-output-under-a-file", ("export-original", "{model}", "-o", "{case}/file/x.pth"), "{case}/file", "file"
    ),
    Case("finetune-max-steps-0", _finetune("--max_steps", "0"), "--max_steps 0 trains nothing", "classes"),
    # -- missing required flags: every sub-command, both training scripts, and the real paths -------------
    *_missing_flag_cases(),
    Case("missing-args-finetune", ("finetune", "--train_dir", "{case}"), "required: --model_name_or_path"),
    Case("missing-args-finetune-segmentation", ("finetune-segmentation", "--output_dir", "{case}/run"), "required"),
    Case("missing-args-pretrain", ("pretrain", "--output_dir", "{case}/run"), "give exactly one of --dataset_dir"),
    Case("missing-args-features-real", ("features", "{case}/x.png"), "required: --model", real=True),
    Case(
        "missing-args-finetune-script-real",
        ("--train_dir", "{case}"),
        "required: --model_name_or_path",
        real=True,
        program=FINETUNE_SCRIPT,
    ),
    Case(
        "unknown-flag-pretrain-script-real",
        ("--output_dir", "{case}/run", "--no-such-flag"),
        "unrecognized arguments: --no-such-flag",
        real=True,
        program=PRETRAIN_SCRIPT,
    ),
    Case("unknown-sub-command", ("frobnicate",), "invalid choice: 'frobnicate'"),
]
BATCHED = [case for case in CASES if not case.real]
IDS = [case.id for case in CASES]
assert len(set(IDS)) == len(IDS), "case ids must be unique"


# -- inputs, written by the test -----------------------------------------------------------------------


def _tiny_state_dict(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint, weights_only=True)


def _save(folder: Path, obj, **options) -> None:
    import torch

    torch.save(obj, folder / "ckpt.pth", **options)


def _checkpoint_setup(edit: Callable[[dict], object], **options) -> Callable[[Path, Path], None]:
    def setup(folder: Path, checkpoint: Path) -> None:
        _save(folder, edit(_tiny_state_dict(checkpoint)), **options)

    return setup


def _without(prefix: str) -> Callable[[dict], dict]:
    return lambda sd: {key: value for key, value in sd.items() if not key.startswith(prefix)}


def _evil(folder: Path, checkpoint: Path, **options) -> None:
    _save(folder, {**_tiny_state_dict(checkpoint), "extra": _RunsCode(folder / "PWNED")}, **options)


def _one_channel(sd: dict) -> dict:
    sd = dict(sd)
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"][:, :1].clone()
    pixels = sd["decoder_pred.weight"].shape[0] // 3
    sd["decoder_pred.weight"] = sd["decoder_pred.weight"][:pixels].clone()
    sd["decoder_pred.bias"] = sd["decoder_pred.bias"][:pixels].clone()
    return sd


def _truncated(folder: Path, checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    (folder / "ckpt.pth").write_bytes(data[: len(data) // 2])


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(path)


def _images(folder: Path, checkpoint: Path) -> None:
    import numpy as np
    from test_io_limits import write_rle_dicom

    _png(folder / "in" / "good.png")
    (folder / "in" / "garbage.png").write_bytes(b"this is not an image\n" * 8)
    _png(folder / "in" / "whole.png", seed=1)
    data = (folder / "in" / "whole.png").read_bytes()
    (folder / "in" / "whole.png").unlink()
    (folder / "in" / "truncated.png").write_bytes(data[: len(data) // 2])
    write_rle_dicom(folder / "in" / "lying.dcm", np.zeros((32, 32), np.uint8), claim=(65535, 65535))


def _links(folder: Path, checkpoint: Path) -> None:
    _png(folder / "links" / "good.png")
    (folder / "links" / "dangling.png").symlink_to(folder / "links" / "nowhere.png")
    (folder / "links" / "loop.png").symlink_to(folder / "links" / "loop.png")
    (folder / "links" / "sub").mkdir()
    (folder / "links" / "sub" / "up").symlink_to(folder / "links", target_is_directory=True)  # a folder loop


def _ingest_links(folder: Path, checkpoint: Path) -> None:
    dataset = folder / "root" / "kidneyUS"
    _png(dataset / "1_good.png")
    (dataset / "2_gone.png").symlink_to(dataset / "nowhere.png")
    (dataset / "3_loop.png").symlink_to(dataset / "3_loop.png")


def _class_folders(images: bool, corrupt: bool = False) -> Callable[[Path, Path], None]:
    def setup(folder: Path, checkpoint: Path) -> None:
        for name in ("benign", "malignant"):
            (folder / "train" / name).mkdir(parents=True)
            for index in range(2 if images else 0):
                path = folder / "train" / name / f"{index}.png"
                if corrupt:
                    path.write_bytes(b"corrupt")
                else:
                    _png(path, seed=index)

    return setup


def _read_only(folder: Path, checkpoint: Path) -> None:
    (folder / "ro").mkdir()
    (folder / "ro").chmod(0o555)


def _file(folder: Path, checkpoint: Path) -> None:
    (folder / "file").write_text("a file where the output's parent folder should be\n")


SETUPS: dict[str, Callable[[Path, Path], None]] = {
    "none": lambda folder, checkpoint: None,
    "ckpt-integer-key": _checkpoint_setup(lambda sd: {**sd, 7: sd["norm.bias"]}),
    "ckpt-0-dim-tensor": _checkpoint_setup(lambda sd: {**sd, "cls_token": sd["cls_token"].sum()}),
    "ckpt-no-encoder-blocks": _checkpoint_setup(_without("blocks.")),
    "ckpt-no-decoder-blocks": _checkpoint_setup(_without("decoder_blocks.")),
    "ckpt-sparse-tensor": _checkpoint_setup(lambda sd: {**sd, "norm.weight": sd["norm.weight"].to_sparse()}),
    "ckpt-int64-tensors": _checkpoint_setup(lambda sd: {key: (value * 100).long() for key, value in sd.items()}),
    "ckpt-1-channel": _checkpoint_setup(_one_channel),
    "ckpt-fp16": _checkpoint_setup(lambda sd: {key: value.half() for key, value in sd.items()}),
    "ckpt-truncated": _truncated,
    "ckpt-empty": lambda folder, checkpoint: (folder / "ckpt.pth").write_bytes(b""),
    "ckpt-legacy-evil": lambda folder, checkpoint: _evil(
        folder, checkpoint, _use_new_zipfile_serialization=False, pickle_protocol=4
    ),
    "ckpt-zip-evil": _evil,
    "images": _images,
    "links": _links,
    "ingest-links": _ingest_links,
    "empty-classes": _class_folders(images=False),
    "corrupt-classes": _class_folders(images=True, corrupt=True),
    "classes": _class_folders(images=True),
    "read-only": _read_only,
    "file": _file,
    "output-folder": lambda folder, checkpoint: (_images(folder, checkpoint), (folder / "out.parquet").mkdir()),
    "file+images": lambda folder, checkpoint: (_file(folder, checkpoint), _images(folder, checkpoint)),
    "read-only+images": lambda folder, checkpoint: (_read_only(folder, checkpoint), _images(folder, checkpoint)),
}


def _chmod_has_effect(root: Path) -> bool:
    """False for root (and other users who may write into a mode-0555 folder)."""
    probe = root / "chmod-probe"
    probe.mkdir(exist_ok=True)
    probe.chmod(0o555)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def _snapshot(folder: Path) -> dict[str, list]:
    """Every path under ``folder`` (links not followed) with its kind, and a file's size and modification time."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        # a folder's own times change when a temporary file comes and goes: only what it holds counts
        entries[str(path.relative_to(folder))] = [kind] if kind == "dir" else [kind, stat.st_size, stat.st_mtime_ns]
    return entries


def _fill(argv: tuple[str, ...], values: dict[str, str]) -> list[str]:
    return [word.format(**values) for word in argv]


# -- running the rows --------------------------------------------------------------------------------


def _live_children(pid: int, *, session: bool = False) -> list[str]:
    """Processes (not zombies) whose parent (or session, for ``session=True``) is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3 if session else 1]) == pid:
            found.append(f"{entry.name} {command}")
    return found


def _wait_for_no_children(pid: int, *, session: bool = False, seconds: float = 5.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _live_children(pid, session=session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _captured(call: Callable[[], object]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``call()``, captured at the file-descriptor level."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            result = call()
            status = 0 if result is None else int(result)
        except SystemExit as exited:
            status = exited.code if isinstance(exited.code, int) else 0 if exited.code is None else 1
        except BaseException:  # escaped the command line's failure path: the real console script would print this
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        return status, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def run_batch(cases_file: str, results_file: str) -> None:
    """The child: run every ``(id, argv)`` of ``cases_file`` through ``usfmae_hf.cli.main``; write the results."""
    from usfmae_hf.cli import main

    results = {}
    for case_id, argv in json.loads(Path(cases_file).read_text()):
        start = time.perf_counter()
        status, out, err = _captured(lambda argv=argv: main(argv))
        results[case_id] = {
            "status": status,
            "stdout": out,
            "stderr": err,
            "children": _wait_for_no_children(os.getpid()),
            "seconds": time.perf_counter() - start,
        }
    Path(results_file).write_text(json.dumps(results))


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("USFMAE_DEBUG", "PYTEST_XDIST_WORKER")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}


@dataclass
class Corpus:
    root: Path
    values: dict[str, str]
    skipped: dict[str, str]
    before: dict[str, dict]
    results: dict[str, dict]

    def folder(self, case: Case) -> Path:
        return self.root / "cases" / case.id


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tiny_original_checkpoint, tiny_model_dir) -> Corpus:
    """Every row's inputs, and the batched rows' results: built once per session, whatever the xdist workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # under xdist each worker has its own base folder in the session's one: that one is shared
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "regression-corpus"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / ".lock")):
        state = root / "state.json"
        if not state.exists():
            _build(root, tiny_original_checkpoint, tiny_model_dir, state)
        return Corpus(root=root, **json.loads(state.read_text()))


def _build(root: Path, checkpoint: Path, model: Path, state: Path) -> None:
    import torch

    read_only_works = _chmod_has_effect(root)
    skipped, before = {}, {}
    for case in CASES:
        if case.needs == "no-gpu" and torch.cuda.is_available():
            skipped[case.id] = "a CUDA GPU is available here"
        elif case.needs == "read-only" and not read_only_works:
            skipped[case.id] = "chmod 555 does not stop this user from writing (root)"
    values = {"model": str(model), "checkpoint": str(checkpoint)}
    for case in CASES:
        folder = root / "cases" / case.id
        folder.mkdir(parents=True)
        SETUPS[case.setup](folder, checkpoint)
        before[case.id] = _snapshot(folder)
    (root / "cwd").mkdir()
    batch = [(c.id, _fill(c.argv, {**values, "case": str(root / "cases" / c.id)})) for c in BATCHED]
    batch = [(case_id, argv) for case_id, argv in batch if case_id not in skipped]
    (root / "batch.json").write_text(json.dumps(batch))
    subprocess.run(
        [sys.executable, __file__, str(root / "batch.json"), str(root / "results.json")],
        cwd=root / "cwd",
        env=_environment(),
        check=True,
        timeout=600,
    )
    results = json.loads((root / "results.json").read_text())
    state.write_text(json.dumps({"values": values, "skipped": skipped, "before": before, "results": results}))


def _run_real(case: Case, corpus: Corpus) -> dict:
    argv = _fill(case.argv, {**corpus.values, "case": str(corpus.folder(case))})
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *case.program, *argv],
        cwd=corpus.root / "cwd",
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its session id is its pid: what it leaves running is found by session
    )
    out, err = process.communicate(timeout=300)
    return {
        "status": process.returncode,
        "stdout": out,
        "stderr": err,
        "children": _wait_for_no_children(process.pid, session=True),
        "seconds": time.perf_counter() - start,
    }


def _screen_lines(text: str) -> list[str]:
    """The non-blank lines ``text`` leaves on a terminal: of each line, what follows its last carriage return."""
    return [shown for line in text.split("\n") if (shown := line.rsplit("\r", 1)[-1]).strip()]


def _release_read_only(folder: Path) -> None:
    if (folder / "ro").exists():
        (folder / "ro").chmod(0o755)  # so that pytest can clean up


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_corpus_case(case: Case, corpus: Corpus):
    if case.id in corpus.skipped:
        pytest.skip(corpus.skipped[case.id])
    folder = corpus.folder(case)
    result = _run_real(case, corpus) if case.real else corpus.results[case.id]
    _release_read_only(folder)
    err = result["stderr"]
    lines = _screen_lines(err)
    shown = f"status {result['status']}, stderr:\n{err}\nstdout:\n{result['stdout'][-2000:]}"

    assert result["status"] == case.status, shown
    assert "Traceback" not in err and "weights_only" not in err, shown
    lines = [line for line in lines if case.leading is None or not line.startswith(case.leading)]
    if case.expect is None:
        assert not lines, shown
    else:
        assert len(lines) == 1, shown
        assert ": error: " in lines[0] and "unexpected error" not in lines[0], shown
        # the row's folder is named after the row: its path must not be what matches
        assert case.expect in lines[0].split(": error: ", 1)[1].replace(str(folder), "{case}"), shown
    for name in case.absent:
        assert not (folder / name).exists(), f"{name} exists: a pickle ran code"
    after = _snapshot(folder)
    changed = {
        name for name in set(after) | set(corpus.before[case.id]) if after.get(name) != corpus.before[case.id].get(name)
    }
    allowed = {name for name in changed if any(name == c or name.startswith(f"{c}/") for c in case.created)}
    assert changed == allowed, f"left behind or changed: {sorted(changed - allowed)}"
    for name in case.created:
        assert (folder / name).exists(), f"{name} was not written"
    assert not result["children"], f"processes left running: {result['children']}"


def test_corpus_leaves_the_working_directory_empty(corpus: Corpus):
    assert not list((corpus.root / "cwd").iterdir())


def test_corpus_covers_every_command_without_arguments():
    from usfmae_hf.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if hasattr(action, "choices") and action.dest == "command"]
    assert {f"missing-args-{name}" for name in commands.choices} <= set(IDS)


if __name__ == "__main__":
    run_batch(*sys.argv[1:3])
