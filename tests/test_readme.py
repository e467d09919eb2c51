"""Every command and snippet of README.md runs, in README order, at reduced size.

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


def readme_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(README.read_text())]


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


@pytest.mark.slow
def test_every_readme_command_and_snippet_runs(workspace, hub_server):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",  # the push goes to the local server below, nowhere else
        "HF_ENDPOINT": hub_server.url,
        "HF_TOKEN": "hf_readme_test_token",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    ran = []
    for lang, body in readme_blocks():
        if lang == "python":
            result = subprocess.run(
                [sys.executable, "-c", body], cwd=workspace, env=env, capture_output=True, text=True, timeout=600
            )
            ran.append(body.splitlines()[0])
            assert result.returncode == 0, f"README snippet failed:\n{body}\n{result.stderr[-3000:]}"
            continue
        if lang != "bash":
            continue
        for command in bash_commands(body):
            if command.startswith("pip install"):
                continue  # the newcomer commands: .ci/run and test_quickstart.py run them
            result = subprocess.run(
                reduce(command), cwd=workspace, env=env, capture_output=True, text=True, timeout=900
            )
            ran.append(command)
            assert result.returncode == 0, (
                f"README command failed: {command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
    assert len(ran) >= 18
    assert (workspace / "usf-mae-vit-base" / "model.safetensors").is_file()
    assert (workspace / "runs" / "pretrain-nodes" / "final" / "config.json").is_file()
    assert (workspace / "runs" / "busbra-f1" / "all_results.json").is_file()
    assert (workspace / "runs" / "lesions-seg" / "test_per_image_metrics.csv").is_file()
    assert (workspace / "masks" / "scan_mask.png").is_file()
    pushed = hub_server.files("your-org/usf-mae-vit-base")
    assert pushed["model.safetensors"] == (workspace / "usf-mae-vit-base" / "model.safetensors").read_bytes()
