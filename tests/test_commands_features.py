"""``usfmae features`` and ``usfmae reconstruct`` end to end on tiny models, real DICOMs and written PNGs."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

import usfmae_hf.inference.feature_files
import usfmae_hf.io
from usfmae_hf import precision
from usfmae_hf.cli import main
from usfmae_hf.inference.feature_files import FeaturesInterrupted, write_features
from usfmae_hf.inference.features import extract_features, load_encoder


@pytest.fixture()
def inputs(tmp_path, ultrasound_dicoms):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(
            folder / "sub" / f"img{index}.png"
        )
    shutil.copy(ultrasound_dicoms["OBXXXX1A_2frame.dcm"], folder / "cine.dcm")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def write_pngs(folder, count, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, name in enumerate(names or [f"img{i}.png" for i in range(count)]):
        Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(folder / name)


def features_args(inputs, model, output, *extra):
    return ["features", *map(str, inputs), "--model", str(model), "--output", str(output), "-q", *extra]


def read_parquet(path):
    table = pq.read_table(path).to_pydict()
    return table["path"], table["frame"], np.array(table["features"], dtype=np.float32)


def parquet_metadata(path):
    return json.loads(pq.read_schema(path).metadata[b"usfmae"])


def interrupt_at_file(monkeypatch, number):
    """Make the ``number``-th file opened by write_features raise KeyboardInterrupt (as Ctrl-C would)."""
    real_load_frames = usfmae_hf.io.load_frames
    opened = []

    def interrupted(path, **kwargs):
        opened.append(path)
        if len(opened) == number:
            raise KeyboardInterrupt
        return real_load_frames(path, **kwargs)

    monkeypatch.setattr(usfmae_hf.inference.feature_files, "load_frames", interrupted)
    return lambda: monkeypatch.setattr(usfmae_hf.inference.feature_files, "load_frames", real_load_frames)


def test_features_parquet_matches_the_api(inputs, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "features.parquet"
    assert main(features_args([inputs], tiny_model_dir, output, "--batch-size", "4", "--dtype", "fp32")) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert captured.out.splitlines()[0] == "precision: fp32 (requested)"
    assert "wrote 8 feature rows from 7 file(s)" in captured.out
    paths, frame_indices, features = read_parquet(output)
    assert paths[:2] == [str(inputs / "cine.dcm")] * 2 and frame_indices[:2] == [0, 1]
    assert paths[2:] == [str(inputs / "sub" / f"img{i}.png") for i in range(6)]
    frames = [frame.image for path in sorted(set(paths)) for frame in usfmae_hf.io.load_frames(path)]
    expected = extract_features(load_encoder(tiny_model_dir), frames)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)
    meta = parquet_metadata(output)
    assert (meta["dtype"], meta["precision"], meta["pooling"], meta["shape"]) == (
        "fp32",
        "fp32 (requested)",
        "cls",
        [8, 32],
    )
    assert {"config.json", "model.safetensors"} <= set(meta["model_files"]) and meta["image_size"] == 32
    assert not (tmp_path / "features.parquet.partial").exists()
    # an existing output is not replaced without --overwrite
    assert main(features_args([inputs], tiny_model_dir, output)) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("flags, name, reason", [("amx_bf16 amx_tile", "bf16", "CPU has AMX"), ("avx2", "fp32", None)])
def test_auto_precision_is_printed_and_recorded_beside_npy(
    flags, name, reason, tiny_model_dir, tmp_path, ultrasound_dicoms, monkeypatch, capsys
):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
    reason = reason or "CPU has no AMX or AVX-512 BF16"
    output = tmp_path / "cine.npy"
    cine = ultrasound_dicoms["color3d_jpeg_baseline.dcm"]
    args = features_args([cine], tiny_model_dir, output, "--pooling", "patches", "--frame-stride", "50")
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"precision: {name} ({reason})"
    features = np.load(output)
    assert features.shape == (3, 16, 32)
    with open(tmp_path / "cine.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["path", "frame"]] + [[str(cine), str(i)] for i in (0, 50, 100)]
    meta = json.loads((tmp_path / "cine.json").read_text())
    assert (meta["dtype"], meta["precision"], meta["frame_stride"], meta["shape"]) == (
        name,
        f"{name} ({reason})",
        50,
        [3, 16, 32],
    )
    frames = [f.image for f in usfmae_hf.io.load_frames(cine, frame_stride=50)]
    full = extract_features(load_encoder(tiny_model_dir), frames, "patches").numpy()
    if name == "fp32":
        np.testing.assert_allclose(features, full, rtol=1e-5, atol=1e-6)
    else:  # really computed in bf16: close to fp32, not equal
        assert 0 < np.abs(features - full).max() < 0.1


def test_names_with_quotes_commas_and_newlines_round_trip_through_the_csv(tiny_model_dir, tmp_path):
    names = ['say "hi", twice.png', "two\nlines.png", "plain.png"]
    write_pngs(tmp_path / "odd", 3, names)
    output = tmp_path / "odd.npy"
    assert main(features_args([tmp_path / "odd"], tiny_model_dir, output, "--dtype", "fp32")) == 0
    expected = sorted(str(tmp_path / "odd" / name) for name in names)
    table = pyarrow.csv.read_csv(
        tmp_path / "odd.csv", parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True)
    ).to_pydict()
    assert table == {"path": expected, "frame": [0, 0, 0]}
    assert len(np.load(output)) == 3


def test_a_file_reached_through_a_symlink_loop_is_read_once(tiny_model_dir, tmp_path, capsys):
    scans = tmp_path / "scans"
    write_pngs(scans / "a", 2)
    (scans / "a" / "loop").symlink_to("..")  # scans/a/loop/a/loop/... is scans/a again
    (tmp_path / "img0-link.png").symlink_to(scans / "a" / "img0.png")
    expected = [str(scans / "a" / f"img{i}.png") for i in range(2)]
    for inputs in (
        [f"{scans}/**"],  # a quoted recursive glob, which follows the loop
        [scans / "a" / "loop" / "a" / "img0.png", tmp_path / "img0-link.png", scans / "a"],  # one file, 3 spellings
    ):
        output = tmp_path / "f.parquet"
        assert main(features_args(inputs, tiny_model_dir, output, "--dtype", "fp32", "--overwrite")) == 0
        assert "wrote 2 feature rows from 2 file(s)" in capsys.readouterr().out
        assert read_parquet(output)[0] == expected


def test_rerun_after_interruption_resumes(inputs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference.parquet"
    assert main(features_args([inputs], tiny_model_dir, reference)) == 0

    output = tmp_path / "resumed.parquet"
    restore = interrupt_at_file(monkeypatch, 5)
    with pytest.raises(FeaturesInterrupted) as interrupted:
        write_features([inputs], tiny_model_dir, output, checkpoint_rows=2, progress=False, on_skip=print)
    assert (interrupted.value.rows, interrupted.value.files) == (4, 3)  # the cine's 2 frames, img0, img1
    assert not output.exists() and list((tmp_path / "resumed.parquet.partial").glob("shard-*.npz"))
    restore()
    capsys.readouterr()
    assert main(features_args([inputs], tiny_model_dir, output)) == 0
    assert "(3 resumed from an interrupted run)" in capsys.readouterr().out
    resumed, clean = read_parquet(output), read_parquet(reference)
    assert resumed[:2] == clean[:2]
    np.testing.assert_allclose(resumed[2], clean[2], rtol=1e-5, atol=1e-6)


def test_a_cine_resumes_from_its_committed_frames(tiny_model_dir, tmp_path, ultrasound_dicoms, monkeypatch):
    cine = ultrasound_dicoms["color3d_jpeg_baseline.dcm"]
    real_load_frames = usfmae_hf.io.load_frames

    def interrupted_after_two_frames(path, **kwargs):
        for count, frame in enumerate(real_load_frames(path, **kwargs)):
            if count == 2:
                raise KeyboardInterrupt
            yield frame

    output = tmp_path / "cine.parquet"
    options = dict(frame_stride=30, batch_size=1, checkpoint_rows=1, progress=False, dtype="fp32")
    monkeypatch.setattr(usfmae_hf.inference.feature_files, "load_frames", interrupted_after_two_frames)
    with pytest.raises(FeaturesInterrupted) as interrupted:
        write_features([cine], tiny_model_dir, output, **options)
    assert (interrupted.value.rows, interrupted.value.files) == (2, 0)  # frames 0 and 30, the cine unfinished
    monkeypatch.setattr(usfmae_hf.inference.feature_files, "load_frames", real_load_frames)
    calls = []
    real_extract = usfmae_hf.inference.feature_files.extract_features
    monkeypatch.setattr(
        usfmae_hf.inference.feature_files,
        "extract_features",
        lambda encoder, images, *args, **kwargs: (
            calls.append(len(images)) or real_extract(encoder, images, *args, **kwargs)
        ),
    )
    assert write_features([cine], tiny_model_dir, output, **options).resumed_files == 1
    assert sum(calls) == 2  # only frames 60 and 90 were encoded again
    paths, frame_indices, features = read_parquet(output)
    assert frame_indices == [0, 30, 60, 90]
    frames = [f.image for f in real_load_frames(cine, frame_stride=30)]
    expected = real_extract(load_encoder(tiny_model_dir), frames).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_resume_refuses_what_changes_the_numbers_and_overwrite_starts_clean(
    inputs, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    output = tmp_path / "f.parquet"
    restore = interrupt_at_file(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        write_features([inputs], model, output, checkpoint_rows=1, progress=False, dtype="fp32", on_skip=print)
    restore()
    capsys.readouterr()
    assert main(features_args([inputs], model, output, "--dtype", "bf16")) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # (after transformers' weight-loading bar)
    assert error.startswith("usfmae features: error: ")
    assert 'other settings (dtype was "fp32", now "bf16"): ' in error and "--overwrite" in error
    os.utime(model / "model.safetensors", ns=(1, 1))  # the weights were replaced since
    assert main(features_args([inputs], model, output, "--dtype", "fp32")) == 2
    assert "model_files.model.safetensors was " in capsys.readouterr().err
    assert main(features_args([inputs], model, output, "--dtype", "bf16", "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "wrote 8 feature rows" in out and "resumed" not in out
    assert parquet_metadata(output)["dtype"] == "bf16"


def test_overwrite_discards_a_foreign_or_failed_partial(inputs, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "f.parquet"
    partial = tmp_path / "f.parquet.partial"
    # a typo in --model fails before anything is saved
    assert main(features_args([inputs], tmp_path / "modle", output)) == 2
    assert "config.json" in capsys.readouterr().err and not partial.exists()
    # a partial directory from another run (other settings, a shard this version cannot read)
    partial.mkdir()
    (partial / "settings.json").write_text(json.dumps({"model": "/elsewhere", "pooling": "mean"}))
    (partial / "shard-000000.npz").write_bytes(b"not a shard")
    assert main(features_args([inputs], tiny_model_dir, output)) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and 'pooling was "mean", now "cls"' in error and "dtype was (not set)" in error
    (partial / "settings.json").unlink()
    assert main(features_args([inputs], tiny_model_dir, output)) == 2
    assert "no settings.json" in capsys.readouterr().err
    assert main(features_args([inputs], tiny_model_dir, output, "--overwrite")) == 0
    assert "wrote 8 feature rows from 7 file(s) to" in capsys.readouterr().out and not partial.exists()


# Runs the real CLI with slow reads (as from a network disk) and a short commit interval, so that a
# SIGINT lands between commits in a test of a few seconds.
SLOW_FEATURES = """
import functools, sys, time
import usfmae_hf.inference.feature_files as feature_files
real_load_frames = feature_files.load_frames
def slow_load_frames(path, **kwargs):
    time.sleep(0.25)
    return real_load_frames(path, **kwargs)
feature_files.load_frames = slow_load_frames
feature_files.write_features = functools.partial(feature_files.write_features, checkpoint_seconds=0.2)
import usfmae_hf.inference.distributed_features as distributed_features
distributed_features.write_features = feature_files.write_features
from usfmae_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_keeps_committed_rows_and_the_printed_command_resumes(tiny_model_dir, tmp_path, capsys):
    write_pngs(tmp_path / "scans", 12)
    clean = tmp_path / "clean.parquet"
    options = ("--batch-size", "2", "--dtype", "fp32")
    assert main(features_args([tmp_path / "scans"], tiny_model_dir, clean, *options)) == 0
    output = tmp_path / "f.parquet"
    output.write_bytes(b"an older output, replaced at the end")
    command = features_args([tmp_path / "scans"], tiny_model_dir, output, *options, "--overwrite")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen(
        [sys.executable, "-c", SLOW_FEATURES, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    partial = tmp_path / "f.parquet.partial"
    deadline = time.monotonic() + 120
    while not list(partial.glob("shard-*.npz")):  # the first committed rows
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, error = run.communicate(timeout=120)
    assert run.returncode == 130, error
    assert output.read_bytes() == b"an older output, replaced at the end"
    committed = {path for shard in partial.glob("shard-*.npz") for path in np.load(shard)["paths"].tolist()}
    assert 0 < len(committed) < 12
    message = next(line for line in error.splitlines() if "to resume" in line)
    assert (
        f"are saved in {partial}; to resume, re-run the same command without --overwrite: usfmae features " in message
    )
    words = shlex.split(message.rpartition(": usfmae features ")[2])
    assert "--overwrite" not in words
    capsys.readouterr()
    assert main(["features", *words]) == 0  # the printed command, run as is
    assert f"({len(committed)} resumed from an interrupted run)" in capsys.readouterr().out
    again, reference = read_parquet(output), read_parquet(clean)
    assert again[:2] == reference[:2] and len(again[0]) == 12
    np.testing.assert_allclose(again[2], reference[2], rtol=1e-5, atol=1e-6)
    assert not partial.exists()


def test_no_readable_frame_is_an_error(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "bad.dcm").write_bytes(b"nothing")
    output = tmp_path / "f.npy"
    assert (
        main(["features", str(tmp_path / "bad.dcm"), "--model", str(tiny_model_dir), "--output", str(output), "-q"])
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.dcm" in err and "no frame could be read" in err
    assert not output.exists()
    assert main(["features", str(tmp_path / "none*.png"), "--model", str(tiny_model_dir), "--output", str(output)]) == 2


def test_reconstruct_command_writes_a_grid(tiny_model_dir, tiny_vit_dir, tmp_path, ultrasound_dicoms, capsys):
    figure = tmp_path / "grid.png"
    source = ultrasound_dicoms["US1_UNCR.dcm"]
    args = ["reconstruct", str(source), "--model", str(tiny_model_dir), "--output", str(figure), "--seed", "1"]
    assert main([*args, "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "precision: bf16 (requested)",
        f"masked 75% of the image; wrote {figure}",
    ]
    with Image.open(figure) as image:
        assert image.format == "PNG"
        settings = json.loads(image.text["usfmae"])
    assert settings == {
        "model": str(tiny_model_dir),
        "input": str(source),
        "frame": 0,
        "mask_ratio": 0.75,
        "seed": 1,
        "dtype": "bf16",
        "precision": "bf16 (requested)",
    }
    assert main([*args, "--dtype", "fp16", "--overwrite"]) == 2
    assert "fp16 is not supported on CPU" in capsys.readouterr().err
    assert main(["reconstruct", str(source), "--model", str(tiny_vit_dir), "--output", str(tmp_path / "x.png")]) == 2
    assert "decoder" in capsys.readouterr().err
