"""Every command and snippet of README.md runs, in README order, at reduced size.

One test per README section (a ``##`` heading), so that the sections run in parallel and a failure names
its section. A section's commands may read what an earlier section's commands wrote: the conversion's
model folders (every section) and, for pretraining, the ingested OpenUS-46 build. Those earlier commands
run first, in this process (each section still runs its own commands as the README gives them, in
subprocesses).

The workspace holds what the README names: a tiny checkpoint in USF-MAE's layout called
``USF-MAE_100ep.pth`` (widths with standard head presets, so no head flags are needed), real ultrasound
scans from ``pydicom-data`` as ``scan.dcm``/``scan.png``/``scans/``, an ``OpenUS-46/`` folder and a
``BUSBRA/`` replica. Reduced size means only: fewer steps and smaller batches, CPU processes instead of
GPUs (``ACCELERATE_USE_CPU=1``, 2 processes, one machine), and the Hub at a local server.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ports import free_port
from synthetic_segmentation import write_generic
from test_data_adapters import write_busbra

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SECTION = re.compile(r"^## (.+)$", re.M)

CONVERSION = "Convert the released checkpoints"
# Sections whose commands read what another section (besides the conversion) writes.
NEEDS: dict[str, tuple[str, ...]] = {"Pretrain": ("Ingest OpenUS-46",)}
# What each section leaves in the workspace; checked after its commands ran.
OUTPUTS: dict[str, tuple[str, ...]] = {
    CONVERSION: (
        "usf-mae-vit-base/model.safetensors",
        "usf-mae-vit-base-encoder/model.safetensors",
        "usf-mae-roundtrip.pth",
    ),
    "Features and reconstructions": (
        "scan-reconstruction.png",
        "features.parquet",
        "reconstruction.png",
        "attention.png",
        "features-multi.parquet",
    ),
    "Ingest OpenUS-46": ("openus46-build",),
    "Pretrain": ("runs/pretrain/final/config.json", "runs/pretrain-nodes/final/config.json"),
    "Fine-tune and evaluate": ("runs/busbra-f1/all_results.json", "runs/busbra-probe"),
    "Segment": ("runs/lesions-seg/test_per_image_metrics.csv", "masks/scan_mask.png"),
}

# Tiny but preset-compatible: width 192 -> 3 heads, decoder width 64 -> 16 heads.
README_MAE = dict(
    image_size=32,
    patch_size=8,
    hidden_size=192,
    num_hidden_layers=1,
    num_attention_heads=3,
    intermediate_size=384,
    decoder_hidden_size=64,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=16,
    decoder_intermediate_size=128,
)

REDUCED_SIZE = [
    (r"--num_train_epochs \d+", "--max_steps 2"),
    (r"--max_steps \d+", "--max_steps 2"),
    (r"--per_device_train_batch_size \d+", "--per_device_train_batch_size 2"),
    (r"--checkpointing_steps \d+", "--checkpointing_steps 1"),
]


def readme_blocks(text: str | None = None) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(README.read_text() if text is None else text)]


def readme_sections() -> dict[str, list[tuple[str, str]]]:
    """README section title -> its code blocks, for the sections with a command or snippet to run."""
    parts = SECTION.split(README.read_text())  # [preamble, title, body, title, body, ...]
    sections = {title.strip(): readme_blocks(body) for title, body in zip(parts[1::2], parts[2::2], strict=True)}
    return {title: blocks for title, blocks in sections.items() if any(runnable(block) for block in blocks)}


def runnable(block: tuple[str, str]) -> list[str]:
    """What of a README block the test runs: a Python snippet whole, a bash block's commands one by one
    (without the newcomer ``pip install`` commands, which .ci/run and test_quickstart.py run)."""
    lang, body = block
    if lang == "python":
        return [body]
    if lang == "bash":
        return [command for command in bash_commands(body) if not command.startswith("pip install")]
    return []


def bash_commands(body: str) -> list[str]:
    return [
        line.strip()
        for line in body.replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def reduce(command: str) -> list[str]:
    """The README command at reduced size (see the module docstring), as an argv."""
    for pattern, replacement in REDUCED_SIZE:
        command = re.sub(pattern, replacement, command)
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[:2] == ["accelerate", "launch"]:
        launch = ["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]
        argv = [sys.executable, "-m", "accelerate.commands.launch", *launch, *_drop_multi_node(argv[2:])]
    finetuning = ("finetune_classification.py", "finetune_segmentation.py")
    if any(part.endswith(("pretrain_mae.py", *finetuning)) for part in argv):
        argv += ["--dataloader_num_workers", "0"]
    if any(part.endswith(finetuning) for part in argv):
        argv += ["--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    if argv[0] == "usfmae":
        argv = [sys.executable, "-m", "usfmae_hf.cli", *argv[1:]]
    return argv


def _drop_multi_node(argv: list[str]) -> list[str]:
    """One machine here: the node rank and main node address of a multi-node launch do not apply."""
    kept, skip = [], False
    for part in argv:
        if skip:
            skip = False
            continue
        if part in ("--machine_rank", "--main_process_ip", "--main_process_port"):
            skip = True
            continue
        kept.append(part)
    return kept


@pytest.fixture
def workspace(tmp_path, ultrasound_dicoms):
    from usfmae_hf.model.reference_mae import ReferenceMAE

    torch.manual_seed(0)
    torch.save(ReferenceMAE.from_hf_config_kwargs(README_MAE).state_dict(), tmp_path / "USF-MAE_100ep.pth")
    shutil.copy(ultrasound_dicoms["US1_UNCR.dcm"], tmp_path / "scan.dcm")
    from usfmae_hf.io import load_image

    load_image(tmp_path / "scan.dcm").save(tmp_path / "scan.png")
    (tmp_path / "scans").mkdir()
    shutil.copy(ultrasound_dicoms["OBXXXX1A.dcm"], tmp_path / "scans" / "ob.dcm")
    shutil.copy(tmp_path / "scan.png", tmp_path / "scans" / "scan.png")
    # OpenUS-46: an HC18-like folder (annotation masks beside images) and a folder of real DICOMs.
    rng = np.random.default_rng(0)
    hc18 = tmp_path / "OpenUS-46" / "HC18" / "training_set"
    hc18.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(hc18 / f"{i:03d}_HC.png")
        Image.fromarray(np.zeros((40, 60), dtype=np.uint8)).save(hc18 / f"{i:03d}_HC_Annotation.png")
    scanners = tmp_path / "OpenUS-46" / "scanners"
    scanners.mkdir()
    for name in ("OBXXXX1A.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "gdcm-US-ALOKA-16.dcm"):
        shutil.copy(ultrasound_dicoms[name], scanners / name)
    write_busbra(tmp_path / "BUSBRA")
    write_generic(tmp_path / "lesions", 4, 2, size=32, n_test=2)
    (tmp_path / "training").symlink_to(ROOT / "training")  # README commands run from a checkout
    return tmp_path


def test_readme_newcomer_test_command_is_what_ci_runs():
    commands = [cmd for lang, body in readme_blocks() if lang == "bash" for cmd in bash_commands(body)]
    test_command = next(cmd for cmd in commands if "pytest" in cmd)
    assert test_command.split(" && ")[0] == 'pip install -e ".[dev]"'
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.split(" && ")[1] in ci  # the same pytest invocation
    assert 'pip install -e ".[dev]"' in ci
    main_job = next(cmd for cmd in commands if "quickstart" in cmd)
    assert (
        main_job == 'pip install -e ".[dev]" && usfmae quickstart --output quickstart-output'
    )  # run by test_quickstart.py


def test_readme_sections_are_the_ones_this_test_knows():
    sections = readme_sections()
    assert list(sections)[0] == CONVERSION  # what every other section reads comes first
    assert set(OUTPUTS) | set(NEEDS) | {need for needs in NEEDS.values() for need in needs} <= set(sections)
    every_block = [block for block in readme_blocks() if runnable(block)]
    assert [block for blocks in sections.values() for block in blocks if runnable(block)] == every_block
    assert sum(len(runnable(block)) for block in every_block) >= 18


def _prepare(section: str, workspace: Path) -> None:
    """Run, in this process, the bash commands of the sections whose outputs ``section`` reads."""
    from usfmae_hf.cli import main

    sections = readme_sections()
    needs = () if section == CONVERSION else (CONVERSION, *NEEDS.get(section, ()))
    for need in needs:
        for lang, body in sections[need]:
            if lang != "bash":
                continue
            for command in runnable((lang, body)):
                argv = shlex.split(command)
                assert argv[0] == "usfmae", f"a prerequisite must be a usfmae command: {command}"
                assert main(argv[1:]) == 0, f"prerequisite of {section!r} failed: {command}"
    assert all((workspace / path).exists() for need in needs for path in OUTPUTS.get(need, ()))


@pytest.mark.slow
@pytest.mark.parametrize("section", list(readme_sections()))
def test_readme_section_runs(section, workspace, hub_server, monkeypatch):
    monkeypatch.chdir(workspace)
    _prepare(section, workspace)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",  # the push goes to the local server below, nowhere else
        "HF_ENDPOINT": hub_server.url,
        "HF_TOKEN": "hf_readme_test_token",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    for lang, body in readme_sections()[section]:
        for command in runnable((lang, body)):
            if lang == "python":
                result = subprocess.run(
                    [sys.executable, "-c", command], cwd=workspace, env=env, capture_output=True, text=True, timeout=600
                )
                assert result.returncode == 0, f"README snippet failed:\n{command}\n{result.stderr[-3000:]}"
                continue
            result = subprocess.run(
                reduce(command), cwd=workspace, env=env, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, (
                f"README command failed: {command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
    missing = [path for path in OUTPUTS.get(section, ()) if not (workspace / path).exists()]
    assert not missing, f"README section {section!r} did not write {missing}"
    if section == "Publish":
        pushed = hub_server.files("your-org/usf-mae-vit-base")
        assert pushed["model.safetensors"] == (workspace / "usf-mae-vit-base" / "model.safetensors").read_bytes()
