"""Atomic outputs: complete or absent, never half-written, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from usfmae_hf.atomic import atomic_directory, atomic_write_text
from usfmae_hf.errors import OutputExistsError


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as staging:
            (staging / "half.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out) as staging:
        (staging / "done.txt").write_text("complete")
    assert (out / "done.txt").read_text() == "complete"
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(out) == 0o777 & ~umask


def test_existing_directory_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        with atomic_directory(out):
            pass
    with pytest.raises(ValueError):
        with atomic_directory(out, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise ValueError("failed before completion")
    assert (out / "old.txt").read_text() == "old"  # a failed overwrite keeps the old output
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_text_replaces_with_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "{}")
    atomic_write_text(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(path) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
