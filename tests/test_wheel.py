"""The built wheel is the whole package: installed into a fresh virtualenv, away from the source tree,
``usfmae quickstart --smoke`` and the training commands work.

The source is copied first (without build outputs) and built there: an in-tree build would write
``build/`` and ``*.egg-info`` into the checkout and could pack files left in ``build/lib`` by an older
build. The virtualenv sees the system's site-packages for torch and the rest, so the test checks that
the wheel's copy of ``usfmae_hf`` is the one imported, not the editable install of the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = ("build", "dist", "*.egg-info", "__pycache__", ".git", ".venv*", ".*_cache", ".benchmarks", "outputs")

# Run inside the virtualenv: every packaged resource, read through the installed package.
RESOURCES_CHECK = """
import sys
from importlib import resources
import usfmae_hf
from usfmae_hf.evaluation.metrics import load_classification_metric
from usfmae_hf.evaluation.segmentation_metrics import load_segmentation_metric
from usfmae_hf.ingest.catalogue import load_catalogue

assert usfmae_hf.__file__.startswith(sys.prefix), usfmae_hf.__file__
templates = [t.name for t in resources.files("usfmae_hf.publishing.templates").iterdir() if t.name.endswith(".md")]
assert "_sections.md" in templates and len(templates) > 2, templates
print(usfmae_hf.__file__, len(load_catalogue()), type(load_classification_metric()).__name__,
      type(load_segmentation_metric()).__name__, sorted(templates))
"""


def _files(root: Path) -> set[str]:
    """Files under ``root`` relative to its parent, symlinked folders followed (as the wheel packs them)."""
    found = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(str((Path(folder) / name).relative_to(root.parent)) for name in names)
    return found


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_runs_the_quickstart_outside_the_source_tree(tmp_path):
    source, dist, venv, elsewhere = (tmp_path / name for name in ("source", "dist", "venv", "elsewhere"))
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    elsewhere.mkdir()
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        elsewhere,
    )
    (wheel,) = dist.glob("usfmae_hf-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.startswith("usfmae_hf/")}
    # every file of the package, package data and the templates behind the symlink included, and nothing else
    assert packed == _files(source / "usfmae_hf")
    assert "usfmae_hf/publishing/templates/_sections.md" in packed and "usfmae_hf/ingest/openus46.csv" in packed

    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], elsewhere)
    python, usfmae = venv / "bin" / "python", venv / "bin" / "usfmae"
    # the system's pip, run by the virtualenv's interpreter, installs into the virtualenv
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        elsewhere,
    )

    checked = _run([str(python), "-c", RESOURCES_CHECK], elsewhere)
    assert checked.stdout.startswith(str(venv)), checked.stdout

    report = _run([str(usfmae), "quickstart", "--output", str(tmp_path / "quickstart"), "--smoke"], elsewhere, 900)
    assert (tmp_path / "quickstart" / "REPORT.md").is_file(), report.stdout[-2000:]
    assert (tmp_path / "quickstart" / "finetune" / "all_results.json").is_file()

    helped = _run([str(usfmae), "pretrain", "--help"], elsewhere)
    assert helped.stdout.startswith("usage: pretrain_mae") and "--output_dir" in helped.stdout
    assert "--max_steps" in helped.stdout
