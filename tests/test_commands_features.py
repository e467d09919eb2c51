"""``usfmae features`` and ``usfmae reconstruct`` end to end on tiny models, real DICOMs and written PNGs."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import usfmae_hf.inference.feature_files
import usfmae_hf.io
from usfmae_hf.cli import main
from usfmae_hf.inference.feature_files import write_features
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


def test_features_parquet_matches_the_api(inputs, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "features.parquet"
    assert (
        main(
            [
                "features",
                str(inputs),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(output),
                "--batch-size",
                "4",
                "-q",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert "wrote 8 feature rows from 7 file(s)" in captured.out
    table = pq.read_table(output).to_pydict()
    assert table["path"][:2] == [str(inputs / "cine.dcm")] * 2 and table["frame"][:2] == [0, 1]
    assert table["path"][2:] == [str(inputs / "sub" / f"img{i}.png") for i in range(6)]
    features = np.array(table["features"], dtype=np.float32)
    frames = [frame.image for path in sorted(set(table["path"])) for frame in usfmae_hf.io.load_frames(path)]
    expected = extract_features(load_encoder(tiny_model_dir), frames)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "features.parquet.partial").exists()
    # an existing output is not replaced without --overwrite
    assert main(["features", str(inputs), "--model", str(tiny_model_dir), "--output", str(output), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_npy_output_patches_and_strides(tiny_model_dir, tmp_path, ultrasound_dicoms):
    output = tmp_path / "cine.npy"
    cine = ultrasound_dicoms["color3d_jpeg_baseline.dcm"]
    args = ["features", str(cine), "--model", str(tiny_model_dir), "--output", str(output), "--pooling", "patches"]
    assert main([*args, "--frame-stride", "50", "-q"]) == 0
    assert np.load(output).shape == (3, 16, 32)
    assert (tmp_path / "cine.csv").read_text().splitlines()[1:] == [f'"{cine}",{i}' for i in (0, 50, 100)]


def test_rerun_after_interruption_resumes(inputs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference.parquet"
    assert main(["features", str(inputs), "--model", str(tiny_model_dir), "--output", str(reference), "-q"]) == 0

    real_load_frames = usfmae_hf.io.load_frames
    opened = []

    def interrupted(path, **kwargs):
        opened.append(path)
        if len(opened) == 5:
            raise KeyboardInterrupt
        return real_load_frames(path, **kwargs)

    output = tmp_path / "resumed.parquet"
    monkeypatch.setattr(usfmae_hf.inference.feature_files, "load_frames", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_features([inputs], tiny_model_dir, output, checkpoint_rows=2, progress=False, on_skip=print)
    assert not output.exists() and list((tmp_path / "resumed.parquet.partial").glob("shard-*.npz"))
    monkeypatch.setattr(usfmae_hf.inference.feature_files, "load_frames", real_load_frames)
    capsys.readouterr()
    args = ["features", str(inputs), "--model", str(tiny_model_dir), "--output", str(output), "-q"]
    assert main(args) == 0
    assert "(3 resumed from an interrupted run)" in capsys.readouterr().out
    assert pq.read_table(output).to_pydict()["path"] == pq.read_table(reference).to_pydict()["path"]
    np.testing.assert_allclose(
        np.array(pq.read_table(output)["features"].to_pylist()),
        np.array(pq.read_table(reference)["features"].to_pylist()),
        rtol=1e-5,
        atol=1e-6,
    )


def test_changed_settings_do_not_resume(inputs, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "f.parquet"
    (tmp_path / "f.parquet.partial").mkdir()
    (tmp_path / "f.parquet.partial" / "settings.json").write_text('{"pooling": "mean"}')
    assert main(["features", str(inputs), "--model", str(tiny_model_dir), "--output", str(output), "-q"]) == 2
    assert "other settings" in capsys.readouterr().err


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
    assert (
        main(["reconstruct", str(source), "--model", str(tiny_model_dir), "--output", str(figure), "--seed", "1"]) == 0
    )
    assert "masked 75%" in capsys.readouterr().out
    with Image.open(figure) as image:
        assert image.format == "PNG"
    assert main(["reconstruct", str(source), "--model", str(tiny_vit_dir), "--output", str(tmp_path / "x.png")]) == 2
    assert "decoder" in capsys.readouterr().err
