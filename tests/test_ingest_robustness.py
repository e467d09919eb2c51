"""``usfmae ingest`` on hostile inputs: unreadable paths, lying headers, a concurrent run, a killed run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_ingest import noise, rows_of, save_png
from test_io_limits import write_lying_nifti, write_rle_dicom

from usfmae_hf.cli import main
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest import IngestOptions, ingest
from usfmae_hf.ingest import decode as decode_module

RESIZE = 16


def unreadable_of(report: dict) -> dict[str, dict]:
    return {e["path"]: e for d in report["datasets"] for e in d["unreadable"]}


def test_dangling_looping_fifo_and_denied_paths_are_reported_not_fatal(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    save_png(root / "kidneyUS/1_good.png", noise(1))
    folder = root / "kidneyUS"
    (folder / "2_gone.png").symlink_to(folder / "nowhere.png")
    (folder / "3_loop.png").symlink_to(folder / "3_loop.png")
    (root / "clinic").mkdir()
    (root / "clinic/IM0004").symlink_to(root / "clinic/missing")  # no suffix: could have been a DICOM
    os.mkfifo(folder / "5_pipe.png")  # opening it would block the reader forever
    (folder / "masks").mkdir()
    (folder / "masks/6_mask.png").symlink_to(folder / "nowhere.png")  # excluded by the rules, not unreadable
    (folder / "notes.txt").symlink_to(folder / "nowhere.txt")  # not an image either way
    save_png(root / "kidneyUS/private/7_hidden.png", noise(7))
    save_png(root / "kidneyUS/8_secret.png", noise(8))
    save_png(root / "CCAUI/img_1.png", noise(9))

    # Simulated permission problems (the tests may run as root, for whom chmod changes nothing).
    real_scandir, real_access = os.scandir, os.access

    def scandir(path=".", *args):
        if Path(os.fsdecode(path)) == folder / "private":
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).name != "8_secret.png" and real_access(p, mode))
    output = tmp_path / "build"
    assert main(["ingest", str(root), "-o", str(output), "--resize", str(RESIZE), "--num-proc", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 images from 3 datasets" in out and "6 unreadable files skipped" in out

    report = json.loads((output / "ingest_report.json").read_text())
    reasons = {path: e["reason"] for path, e in unreadable_of(report).items()}
    assert reasons == {
        "kidneyUS/2_gone.png": "dangling symbolic link",
        "kidneyUS/3_loop.png": "symbolic link loop",
        "clinic/IM0004": "dangling symbolic link",
        "kidneyUS/5_pipe.png": "not a regular file",
        "kidneyUS/private": "folder not readable (permission denied)",
        "kidneyUS/8_secret.png": "permission denied",
    }
    kidney = next(d for d in report["datasets"] if d["folder"] == "kidneyUS")
    assert kidney["files"] == 1 and kidney["rows"] == 1 and kidney["excluded_by_rules"] == {"folder 'masks'": 1}
    assert kidney["other_files"] == {".txt": 1}
    assert "kidneyUS/5_pipe.png" in (output / "ingest_report.md").read_text()
    assert sorted(rows_of(output)["path"]) == ["CCAUI/img_1.png", "kidneyUS/1_good.png"]


def test_real_permission_denied_folder_and_file(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    if os.access(probe, os.R_OK):
        pytest.skip("this process reads files whatever their permissions (root)")
    root = tmp_path / "root"
    save_png(root / "kidneyUS/1_good.png", noise(1))
    save_png(root / "kidneyUS/locked/2.png", noise(2))
    save_png(root / "kidneyUS/3_secret.png", noise(3))
    (root / "kidneyUS/locked").chmod(0)
    (root / "kidneyUS/3_secret.png").chmod(0)
    try:
        report = ingest(root, tmp_path / "build", options=IngestOptions(resize=RESIZE), progress=False)
    finally:
        (root / "kidneyUS/locked").chmod(0o755)
    assert {p: e["reason"] for p, e in unreadable_of(report).items()} == {
        "kidneyUS/locked": "folder not readable (permission denied)",
        "kidneyUS/3_secret.png": "permission denied",
    }
    assert report["rows"] == 1


def test_size_guard_skips_lying_and_large_files_and_a_higher_limit_retries(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    write_rle_dicom(root / "clinic/lying.dcm", noise(1, (50, 50)), claim=(65535, 65535))
    honest = write_rle_dicom(root / "clinic/honest.dcm", noise(2, (64, 64)))  # 4096 decoded bytes
    save_png(root / "clinic/scan.png", noise(3))
    output = tmp_path / "build"
    argv = ["ingest", str(root), "-o", str(output), "--resize", str(RESIZE)]
    assert main([*argv, "--max-decoded-mb", "0.001"]) == 0  # 1048 bytes
    assert "2 unreadable files skipped" in capsys.readouterr().out
    unreadable = unreadable_of(json.loads((output / "ingest_report.json").read_text()))
    assert unreadable["clinic/lying.dcm"]["decoded_bytes"] == 65535 * 65535
    assert unreadable["clinic/honest.dcm"]["decoded_bytes"] == pydicom.dcmread(honest).pixel_array.nbytes == 4096
    assert all("over the limit" in e["reason"] for e in unreadable.values())

    decoded = []
    original = decode_module._decode_chunk
    monkeypatch.setattr(decode_module, "_decode_chunk", lambda chunk, *a: decoded.append(a[-1]) or original(chunk, *a))
    assert main([*argv, "--max-decoded-mb", "0.001"]) == 0
    assert decoded == []  # same limit: nothing to retry
    assert main([*argv]) == 0  # the default limit allows the honest file, not the lying one
    assert decoded == [2 * 1024**3]
    report = json.loads((output / "ingest_report.json").read_text())
    assert set(unreadable_of(report)) == {"clinic/lying.dcm"} and report["rows"] == 2
    ds = rows_of(output)
    stored = ds[ds["path"].index("clinic/honest.dcm")]["image"]
    expected = Image.fromarray(noise(2, (64, 64))).resize((RESIZE, RESIZE), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(np.asarray(stored.convert("L")), np.asarray(expected))


def test_memory_error_on_one_file_never_ends_the_batch(tmp_path):
    root = tmp_path / "root"
    write_lying_nifti(root / "clinic/lying.nii.gz", (20000, 20000, 20000, 20000))  # 1.3e18 bytes: MemoryError
    save_png(root / "clinic/scan.png", noise(4))
    report = ingest(root, tmp_path / "build", max_decoded_bytes=2**62, progress=False)
    (failure,) = unreadable_of(report).values()
    assert failure["path"] == "clinic/lying.nii.gz" and failure["reason"].startswith("out of memory")
    assert "decoded_bytes" not in failure and report["rows"] == 1


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_lock_then_sigkill_leaves_no_worker_and_the_next_run_cleans_up(tmp_path, capsys):
    root = tmp_path / "root"
    for k in range(300):
        save_png(root / f"kidneyUS/{k}_scan.png", noise(k, (24, 24)))
        save_png(root / f"CCAUI/img_{k}.png", noise(1000 + k, (24, 24)))
    output = tmp_path / "build"
    command = [sys.executable, "-m", "usfmae_hf.cli", "ingest", str(root), "-o", str(output), "--num-proc", "2"]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink)
    staging = output / ".manifest/staging"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            workers = children_of(first.pid)
            if len(workers) == 2 and len(list(staging.glob("*.parquet"))) >= 2:  # both past their initializer
                break
            time.sleep(0.01)
        assert len(workers) == 2, f"workers never started: {first.poll()=} {log.read_text()}"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # frozen mid-chunk: the build cannot finish under the checks below

        started = time.monotonic()
        assert main(["ingest", str(root), "-o", str(output), "--num-proc", "2"]) == 2
        error = capsys.readouterr().err.strip()
        assert time.monotonic() - started < 5
        assert "\n" not in error and f"process {first.pid} " in error and "being built" in error

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "workers outlived their killed parent"
    finally:
        for pid in [first.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        first.wait(timeout=30)

    # What the killed run left, plus leftovers of the kinds a build names, and a user's file.
    assert list(staging.glob("*.parquet"))
    (staging / "train-ccaui-00009.parquet.tmp").write_bytes(b"half a shard")
    (output / "data/train-ghost-00000.parquet").write_bytes(b"shard without a record")
    (output / ".manifest/chunks/.kidneyus-00000.json.x1y2.tmp").write_text("{")
    (output / "data/notes.txt").write_text("mine")
    resumed = ingest(root, output, progress=False)  # the killed run's lock is free (at most ms after its end)
    assert list(staging.iterdir()) == [] and not list((output / ".manifest/chunks").glob(".*"))
    assert sorted(p.name for p in (output / "data").iterdir()) == sorted(
        ["notes.txt"] + [f"train-{d}-0000{k}.parquet" for d in ("ccaui", "kidneyus") for k in (0, 1)]
    )
    clean = ingest(root, tmp_path / "clean", progress=False)
    assert resumed["datasets"] == clean["datasets"] and resumed["rows"] == 600
    for shard in (tmp_path / "clean/data").iterdir():
        assert shard.read_bytes() == (output / "data" / shard.name).read_bytes()


def test_failed_first_run_leaves_no_output_folder(tmp_path):
    root = tmp_path / "root"
    save_png(root / "kidneyUS/1.png", noise(1))
    with pytest.raises(UsfmaeError, match="no folder"):
        ingest(root, tmp_path / "build", datasets=["nothere"], progress=False)
    assert not (tmp_path / "build").exists()
