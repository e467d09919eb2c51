"""``usfmae ingest`` on replicas of the catalogue's dataset layouts, real DICOMs, a NIfTI volume and a video."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usfmae_hf.cli import main
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest import IngestOptions, NearDuplicateIndex, ingest
from usfmae_hf.ingest import build as build_module
from usfmae_hf.ingest import decode as decode_module

RESIZE = 24


def noise(seed: int, shape=(20, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_nifti(path: Path, volume: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


def save_mha(path: Path, volume: np.ndarray) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    return path


def save_video(path: Path, frames: list[np.ndarray]) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.stack([frame] * 3, -1), format="rgb24")))
        container.mux(stream.encode())
    return path


def write_replica(root: Path) -> dict[str, object]:
    """One folder per catalogue layout (masks beside images), plus a duplicate, a near duplicate and a corrupt file.

    Returns what a correct ingest must produce: the expected (path, frame) rows and a few facts.
    """
    expected: set[tuple[str, int]] = set()
    seed = iter(range(1000, 100000))

    def image(relative: str, array: np.ndarray | None = None) -> Path:
        path = save_png(root / relative, noise(next(seed)) if array is None else array)
        expected.add((relative, 0))
        return path

    # BUS-BRA (held out): images and masks.
    save_png(root / "BUS-BRA/BUSBRA/Images/bus_0001-l.png", noise(1))
    save_png(root / "BUS-BRA/BUSBRA/Masks/mask_0001-l.png", noise(2) // 255 * 255)
    # MMOTU-2D (held out, alias folder name).
    save_png(root / "OTU_2d/images/1.JPG".replace(".JPG", ".png"), noise(3))
    # BUSI: not in the catalogue, masks with _mask, _mask_1 beside the images.
    for k in (1, 2):
        image(f"Dataset_BUSI_with_GT/benign/benign ({k}).png")
        save_png(root / f"Dataset_BUSI_with_GT/benign/benign ({k})_mask.png", noise(10 + k) // 128 * 255)
    save_png(root / "Dataset_BUSI_with_GT/benign/benign (1)_mask_1.png", noise(13) // 128 * 255)
    # FETAL_PLANES_DB: Images/ + semicolon CSV with trailing spaces.
    for patient, plane in ((1, 1), (1, 2), (2, 1)):
        image(f"FETAL_PLANES_DB/Images/Patient{patient:05d}_Plane{plane}_1_of_1.png")
    (root / "FETAL_PLANES_DB/FETAL_PLANES_DB_data.csv").write_text(
        "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train \n"
        "Patient00001_Plane1_1_of_1 ;1;Other ;Not A Brain ;Op. 1;Voluson E6;1 \n"
    )
    # HC18: NNN_HC.png beside NNN_HC_Annotation.png; an exact duplicate of a BUSI image.
    image("HC18/training_set/001_HC.png")
    save_png(root / "HC18/training_set/001_HC_Annotation.png", noise(20) // 128 * 255)
    busi = np.asarray(Image.open(root / "Dataset_BUSI_with_GT/benign/benign (1).png"))
    save_png(root / "HC18/training_set/002_HC.png", busi)  # exact duplicate (removed)
    near = busi.copy()
    near[0, 0] ^= 1
    save_png(root / "HC18/training_set/003_HC.png", near)  # near duplicate (removed)
    # kidneyUS: patient ids from the file names; one truncated PNG.
    image("kidneyUS/100_IM-0246-0030_anon.png")
    image("kidneyUS/101_IM-0001-0002_anon.png")
    corrupt = root / "kidneyUS/102_IM-0001-0003_anon.png"
    corrupt.write_bytes((root / "kidneyUS/100_IM-0246-0030_anon.png").read_bytes()[:60])
    # CAMUS: a 2-D+time NIfTI with its _gt beside it, and an Info_*.cfg.
    volume = np.stack([noise(30 + i, (18, 22)) for i in range(5)], axis=-1)
    save_nifti(root / "CAMUS/database_nifti/patient0001/patient0001_4CH_half_sequence.nii.gz", volume)
    save_nifti(root / "CAMUS/database_nifti/patient0001/patient0001_4CH_half_sequence_gt.nii.gz", volume // 128)
    (root / "CAMUS/database_nifti/patient0001/Info_4CH.cfg").write_text("ED: 1\nES: 5\n")
    # ACOUSLIC-AI: images and masks with the SAME file names.
    uuid = "0199616b-bdeb-4119-97a3-a5a3571bd641"
    save_mha(
        root / f"ACOUSLIC-AI/images/stacked_fetal_ultrasound/{uuid}.mha", np.stack([noise(40 + i) for i in range(3)])
    )
    save_mha(
        root / f"ACOUSLIC-AI/masks/stacked_fetal_abdomen/{uuid}.mha", np.stack([noise(50 + i) // 128 for i in range(3)])
    )
    # regPro: only us_images is ultrasound.
    for modality in ("us_images", "us_labels", "mr_images", "mr_labels"):
        save_nifti(root / f"regPro/train/{modality}/case000001.nii.gz", np.stack([noise(60 + i) for i in range(2)], -1))
    # EchoNet-Dynamic: an AVI + FileList.csv.
    save_video(root / "EchoNet-Dynamic/Videos/0X1A.avi", [noise(70 + i, (16, 16)) for i in range(4)])
    (root / "EchoNet-Dynamic/FileList.csv").write_text(
        "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split\n0X1A,60,20,50,16,16,10,4,TRAIN\n"
    )
    # Thyroid US Cineclip: HDF5 (unsupported without h5py).
    (root / "Thyroid US Cineclip").mkdir()
    (root / "Thyroid US Cineclip/dataset.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    return {"expected": expected, "corrupt": corrupt.relative_to(root).as_posix()}


def frames_of(path: Path) -> int:
    from usfmae_hf.io import load_frames

    return sum(1 for _ in load_frames(path))


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("openus") / "root"
    facts = write_replica(root)
    expected = facts["expected"]
    for pattern, count in (
        ("CAMUS/**/*half_sequence.nii.gz", None),
        ("ACOUSLIC-AI/images/**/*.mha", None),
        ("regPro/train/us_images/*.nii.gz", None),
        ("EchoNet-Dynamic/Videos/*.avi", None),
    ):
        (path,) = root.glob(pattern)
        expected |= {(path.relative_to(root).as_posix(), i) for i in range(count or frames_of(path))}
    output = root.parent / "build"
    report = ingest(root, output, options=IngestOptions(resize=RESIZE), files_per_shard=2, progress=False)
    return {"root": root, "output": output, "report": report, **facts}


def rows_of(output: Path):
    """``load_dataset(output)`` with a fresh cache: datasets 5.2 reuses the cache of another folder of the same name."""
    import tempfile

    from datasets import load_dataset

    return load_dataset(str(output), split="train", cache_dir=tempfile.mkdtemp(dir=output.parent))


def test_build_loads_with_load_dataset_and_holds_only_images(replica):
    ds = rows_of(replica["output"])
    assert set(ds.column_names) == {"image", "dataset", "path", "frame", "group", "sha256"}
    assert ds.features["image"].__class__.__name__ == "Image"
    assert sorted(zip(ds["path"], ds["frame"])) == sorted(replica["expected"])
    assert not any("mask" in p.lower() or "annotation" in p.lower() or "label" in p.lower() for p in ds["path"])
    assert all(image.size == (RESIZE, RESIZE) for image in ds["image"])
    names = dict(zip(ds["path"], ds["dataset"]))
    assert names["HC18/training_set/001_HC.png"] == "HC"
    assert names["Dataset_BUSI_with_GT/benign/benign (1).png"] == "Dataset_BUSI_with_GT"


def test_heldout_sets_are_excluded(replica):
    ds = rows_of(replica["output"])
    assert not {"BUS-BRA", "MMOTU-2D"} & set(ds["dataset"])
    skipped = {s["folder"]: s["reason"] for s in replica["report"]["skipped_folders"]}
    assert "held out" in skipped["BUS-BRA"] and "held out" in skipped["OTU_2d"]


def test_groups_come_from_the_layout(replica):
    groups = {(p, f): g for p, f, g in zip(*(rows_of(replica["output"])[c] for c in ("path", "frame", "group")))}
    assert groups["FETAL_PLANES_DB/Images/Patient00002_Plane1_1_of_1.png", 0] == "Patient00002"
    assert groups["kidneyUS/101_IM-0001-0002_anon.png", 0] == "101"
    assert groups["CAMUS/database_nifti/patient0001/patient0001_4CH_half_sequence.nii.gz", 4] == "patient0001"
    assert groups["EchoNet-Dynamic/Videos/0X1A.avi", 3] == "0X1A"
    assert groups["Dataset_BUSI_with_GT/benign/benign (2).png", 0] is None


def test_stored_pixels_and_hashes(replica):
    """The stored image is PIL's NEAREST resize of the original; sha256 is of the original's RGB pixels."""
    ds = rows_of(replica["output"])
    row = ds[ds["path"].index("kidneyUS/100_IM-0246-0030_anon.png")]
    original = Image.open(replica["root"] / row["path"]).convert("RGB")
    expected = np.asarray(original.resize((RESIZE, RESIZE), Image.NEAREST))
    np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), expected)
    pixels = np.asarray(original)
    assert row["sha256"] == hashlib.sha256(b"20x28x3:" + pixels.tobytes()).hexdigest()
    assert len(set(ds["sha256"])) == len(ds)


def test_duplicates_removed_and_reported(replica):
    hc = next(d for d in replica["report"]["datasets"] if d["dataset"] == "HC")
    assert (hc["exact_duplicates"], hc["near_duplicates"]) == (1, 1)
    by_path = {d["path"]: d for d in hc["duplicates"]}
    assert by_path["HC18/training_set/002_HC.png"]["kind"] == "exact"
    assert by_path["HC18/training_set/003_HC.png"]["kind"] == "near"
    assert (
        by_path["HC18/training_set/003_HC.png"]["duplicate_of"]["path"] == "Dataset_BUSI_with_GT/benign/benign (1).png"
    )


def test_unreadable_files_are_listed_not_fatal(replica):
    report = json.loads((replica["output"] / "ingest_report.json").read_text())
    unreadable = {e["path"]: e["reason"] for d in report["datasets"] for e in d["unreadable"]}
    assert replica["corrupt"] in unreadable
    summary = (replica["output"] / "ingest_report.md").read_text()
    assert replica["corrupt"] in summary
    try:
        import h5py  # noqa: F401
    except ImportError:
        assert "h5py" in unreadable["Thyroid US Cineclip/dataset.hdf5"]


def test_rules_exclusions_are_reported(replica):
    by_folder = {d["folder"]: d for d in replica["report"]["datasets"]}
    assert sum(by_folder["Dataset_BUSI_with_GT"]["excluded_by_rules"].values()) == 3
    assert by_folder["ACOUSLIC-AI"]["excluded_by_rules"] == {"folder 'masks'": 1}
    assert sum(by_folder["regPro"]["excluded_by_rules"].values()) == 3
    assert by_folder["CAMUS"]["other_files"] == {".cfg": 1}
    assert by_folder["Dataset_BUSI_with_GT"]["in_catalogue"] is False
    card = (replica["output"] / "README.md").read_text()
    assert card.startswith("---\n") and "data/*.parquet" in card and "dtype: image" in card


@pytest.fixture
def small_root(tmp_path):
    root = tmp_path / "root"
    for k in range(5):
        save_png(root / f"kidneyUS/{k}_scan.png", noise(k))
        save_png(root / f"CCAUI/img_{k}.png", noise(100 + k))
    return root


def test_rerun_is_incremental(small_root, tmp_path, monkeypatch):
    from datasets import load_dataset

    output = tmp_path / "build"
    options = IngestOptions(resize=RESIZE)
    ingest(small_root, output, options=options, files_per_shard=2, progress=False)
    shards = {p.name: p.stat().st_mtime_ns for p in (output / "data").iterdir()}
    cache = str(tmp_path / "hf_cache")  # one cache for both loads, as a user has: no stale rows after the rerun
    cached_rows = len(load_dataset(str(output), split="train", cache_dir=cache))
    decoded = []
    original = decode_module._decode_chunk
    monkeypatch.setattr(
        decode_module, "_decode_chunk", lambda chunk, *a: decoded.append(chunk.key) or original(chunk, *a)
    )
    ingest(small_root, output, options=options, files_per_shard=2, progress=False)
    assert decoded == []
    save_png(small_root / "kidneyUS/9_scan.png", noise(9))  # sorts last: only the last kidneyUS chunk changes
    report = ingest(small_root, output, options=options, files_per_shard=2, progress=False)
    assert decoded == ["kidneyus-00002"]
    assert report["rows"] == 11 and len(rows_of(output)) == 11
    after = {p.name: p.stat().st_mtime_ns for p in (output / "data").iterdir()}
    assert {k: v for k, v in after.items() if k != "train-kidneyus-00002.parquet"} == {
        k: v for k, v in shards.items() if k != "train-kidneyus-00002.parquet"
    }
    with pytest.raises(UsfmaeError, match="--overwrite"):
        ingest(small_root, output, options=IngestOptions(resize=None), progress=False)
    assert cached_rows == 10 and len(load_dataset(str(output), split="train", cache_dir=cache)) == 11
    report = ingest(small_root, output, options=IngestOptions(resize=None), overwrite=True, progress=False)
    assert report["rows"] == 11 and rows_of(output)[0]["image"].size == (28, 20)


def test_interrupted_run_resumes(small_root, tmp_path, monkeypatch):
    output = tmp_path / "build"
    calls = []
    original = build_module._Build.finish

    def crash_on_second_chunk(self, chunk, staged, result):
        calls.append(chunk.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, chunk, staged, result)

    monkeypatch.setattr(build_module._Build, "finish", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        ingest(small_root, output, files_per_shard=2, progress=False)
    monkeypatch.setattr(build_module._Build, "finish", original)
    decoded = []
    monkeypatch.setattr(
        decode_module, "_decode_chunk", lambda chunk, *a: decoded.append(chunk.key) or {"hashes": [], "errors": []}
    )
    ingest(small_root, output, files_per_shard=2, progress=False)
    assert calls[0] not in decoded and len(decoded) == 5


def test_parallel_build_equals_serial(small_root, tmp_path):
    serial = ingest(small_root, tmp_path / "serial", progress=False, files_per_shard=3)
    parallel = ingest(small_root, tmp_path / "parallel", progress=False, files_per_shard=3, num_proc=2)
    assert serial["datasets"] == parallel["datasets"]
    key = lambda ds: sorted(zip(ds["path"], ds["frame"], ds["sha256"]))  # noqa: E731
    assert key(rows_of(tmp_path / "serial")) == key(rows_of(tmp_path / "parallel"))


def test_real_dicoms_and_cine_frames(ultrasound_dicoms, tmp_path):
    if "color3d_jpeg_baseline.dcm" not in ultrasound_dicoms or "US1_UNCR.dcm" not in ultrasound_dicoms:
        pytest.skip("pydicom-data ultrasound files missing")
    root = tmp_path / "root"
    (root / "clinic").mkdir(parents=True)
    shutil.copy(ultrasound_dicoms["color3d_jpeg_baseline.dcm"], root / "clinic/cine.dcm")
    shutil.copy(ultrasound_dicoms["US1_UNCR.dcm"], root / "clinic/IM0001")  # DICOM without a suffix
    shutil.copy(ultrasound_dicoms["US1_UNCR.dcm"], root / "clinic/copy.dcm")  # exact duplicate
    options = IngestOptions(resize=RESIZE, frame_stride=30, near_dup_threshold=None)
    report = ingest(root, tmp_path / "build", options=options, progress=False)
    ds = rows_of(tmp_path / "build")
    assert sorted(f for p, f in zip(ds["path"], ds["frame"]) if p == "clinic/cine.dcm") == [0, 30, 60, 90]
    assert report["datasets"][0]["exact_duplicates"] == 1 and len(ds) == 5


def test_cli_ingest_push_and_leakage_check(small_root, tmp_path, monkeypatch, capsys, hub_server):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    output = tmp_path / "build"
    argv = ["ingest", str(small_root), "--output", str(output), "--resize", "none", "--datasets", "kidneyus,"]
    assert main([*argv, "--num-proc", "1", "--near-dup-threshold", "-1", "--push-to-hub", "tester/us"]) == 0
    assert "5 images from 1 datasets" in capsys.readouterr().out
    remote = hub_server.files("tester/us", repo_type="dataset")
    local = {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert {name: local[name] for name in remote if name != ".gitattributes"} == {
        name: data for name, data in local.items() if not name.startswith(".manifest/")
    }
    assert rows_of(output)[0]["image"].size == (28, 20)
    assert main(["ingest", str(small_root), "--output", str(output), "--datasets", "nothere"]) == 2
    assert "no folder" in capsys.readouterr().err

    test_set = tmp_path / "testset"
    save_png(test_set / "a.png", noise(2))  # == kidneyUS/2_scan.png
    save_png(test_set / "b.png", noise(500))
    assert main(["leakage-check", str(output), "--against", str(test_set)]) == 1
    assert "1 images shared" in capsys.readouterr().out
    (test_set / "a.png").unlink()
    assert main(["leakage-check", str(output), "--against", str(test_set)]) == 0


def test_thyroid_cineclip_hdf5_frames_and_groups(tmp_path, monkeypatch):
    """The HDF5 path with a stand-in for h5py (not installed here): frames, stride and annot_id groups."""
    import contextlib
    import sys
    import types

    stack = np.stack([noise(700 + i) for i in range(6)])
    content = {"image": stack, "annot_id": np.array([b"12_", b"12_", b"12_", b"40_", b"40_", b"40_"]), "mask": stack}
    fake = types.SimpleNamespace(File=lambda path, mode: contextlib.nullcontext(content))
    monkeypatch.setitem(sys.modules, "h5py", fake)
    root = tmp_path / "root"
    (root / "Thyroid US Cineclip").mkdir(parents=True)
    (root / "Thyroid US Cineclip/dataset.hdf5").write_bytes(b"stand-in")
    ingest(root, tmp_path / "build", options=IngestOptions(resize=None, frame_stride=2), progress=False)
    ds = rows_of(tmp_path / "build")
    assert list(ds["frame"]) == [0, 2, 4] and list(ds["group"]) == ["12_", "12_", "40_"]
    np.testing.assert_array_equal(np.asarray(ds[2]["image"]), stack[4])


def test_output_checks(small_root, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other/file.txt").write_text("keep me")
    with pytest.raises(UsfmaeError, match="not an ingest build"):
        ingest(small_root, tmp_path / "other", overwrite=True, progress=False)
    assert (tmp_path / "other/file.txt").read_text() == "keep me"
    with pytest.raises(UsfmaeError, match="inside ROOT"):
        ingest(small_root, small_root / "build", progress=False)


@pytest.mark.parametrize("threshold", [0, 1, 3, 6])
def test_near_duplicate_index_matches_brute_force(threshold):
    rng = random.Random(threshold)
    hashes = [rng.getrandbits(64) for _ in range(60)]
    hashes += [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in hashes[:40]]  # distance <= 2
    hashes += [h ^ sum(1 << b for b in rng.sample(range(64), 5)) for h in hashes[:30]]  # distance 5
    index, kept_fast = NearDuplicateIndex(threshold), []
    for i, h in enumerate(hashes):
        if index.find(h) is None:
            index.add(h, i)
            kept_fast.append(i)
    kept_slow = []
    for i, h in enumerate(hashes):
        if all((h ^ hashes[j]).bit_count() > threshold for j in kept_slow):
            kept_slow.append(i)
    assert kept_fast == kept_slow
