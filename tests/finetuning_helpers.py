"""Helpers shared by the fine-tuning tests (classification, segmentation): flags, subprocess runs, card snippets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def run_flags(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """The flags of a short CPU fine-tuning run on ``data/{train,validation,test}`` into ``output``, then ``extra``."""
    return [
        "--model_name_or_path",
        str(model_dir),
        "--train_dir",
        str(data / "train"),
        "--validation_dir",
        str(data / "validation"),
        "--test_dir",
        str(data / "test"),
        "--output_dir",
        str(output),
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        *extra,
    ]


def usage_snippet(card: Path, repo_id: str) -> str:
    """The python block of the card's "How to use" section, its ``repo_id = ...`` line pointed at ``repo_id``."""
    text = card.read_text(encoding="utf-8")
    found = re.search(r"^## How to use\n.*?^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert found, f"no python block under 'How to use' in {card}"
    code, count = re.subn(r'^repo_id = ".*"$', f"repo_id = {str(repo_id)!r}", found.group(1), flags=re.MULTILINE)
    assert count == 1, "the snippet names its repository once, as repo_id = ..."
    return code


def run_python(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter in ``cwd``, offline; its stdout (fails the test with its stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
