"""The OpenUS-46 catalogue: contents, name matching, and the per-dataset layout rules."""

from __future__ import annotations

import pytest

from usfmae_hf.cli import main
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest.catalogue import DatasetEntry, find_entry, generic_entry, load_catalogue, normalize_name


def test_catalogue_lists_the_46_datasets_with_three_held_out():
    entries = load_catalogue()
    assert [e.id for e in entries] == list(range(1, 47))
    assert len({normalize_name(e.name) for e in entries}) == 46
    assert sorted(e.name for e in entries if e.held_out) == ["BUS-BRA", "GIST514-DB", "MMOTU-2D"]
    assert all(e.formats and e.link.startswith("http") and e.anatomy for e in entries)
    busbra = find_entry("BUS-BRA")
    assert (busbra.anatomy, busbra.link, busbra.formats) == ("Breast", "https://zenodo.org/records/8231412", ("PNG",))


@pytest.mark.parametrize(
    "query, name",
    [
        ("BUS-BRA", "BUS-BRA"),
        ("busbra", "BUS-BRA"),
        ("Bus_Bra", "BUS-BRA"),
        ("mmotu 2d", "MMOTU-2D"),
        ("OTU_2d", "MMOTU-2D"),
        ("gist514db", "GIST514-DB"),
        ("HC18", "HC"),
        ("hc", "HC"),
        ("ACOUSLIC-AI", "ACOUSLIC"),
        ("camus", "CAMUS_public"),
        ("μ-RegPro", "regPro"),
        ("echonet_dynamic", "EchoNet-Dynamic"),
        ("thyroid us cineclip", "Thyroid US Cineclip"),
        ("BUS (Dataset B)", "BUS (Dataset B)"),
    ],
)
def test_find_entry_ignores_case_and_punctuation(query, name):
    assert find_entry(query).name == name


def test_unknown_name():
    assert find_entry("Dataset_BUSI_with_GT") is None
    with pytest.raises(UsfmaeError, match="did you mean BUS-BRA"):
        find_entry("busbraa", required=True)


# (dataset, path relative to the dataset folder, kept as an image?)
LAYOUT_CASES = [
    ("BUS-BRA", "BUSBRA/Images/bus_0001-l.png", True),
    ("BUS-BRA", "BUSBRA/Masks/mask_0001-l.png", False),
    ("MMOTU-2D", "OTU_2d/images/12.JPG", True),
    ("MMOTU-2D", "OTU_2d/annotations/12.PNG", False),
    ("MMOTU-2D", "OTU_2d/annotations/12_binary.PNG", False),
    ("MMOTU-2D", "OTU_2d/annotations/12_binary_binary.PNG", False),
    ("GIST514-DB", "usd514_jpeg_roi/images/a1.jpg", True),
    ("FETAL_PLANES_DB", "Images/Patient00001_Plane1_1_of_3.png", True),
    ("HC", "training_set/001_HC.png", True),
    ("HC", "training_set/001_HC_Annotation.png", False),
    ("CAMUS_public", "database_nifti/patient0001/patient0001_4CH_half_sequence.nii.gz", True),
    ("CAMUS_public", "database_nifti/patient0001/patient0001_4CH_ED.nii.gz", True),
    ("CAMUS_public", "database_nifti/patient0001/patient0001_4CH_ED_gt.nii.gz", False),
    ("CAMUS_public", "database_nifti/patient0001/patient0001_4CH_half_sequence_gt.nii.gz", False),
    ("EchoNet-Dynamic", "Videos/0X1A0A263B22CCD966.avi", True),
    ("ACOUSLIC", "images/stacked_fetal_ultrasound/0199616b-bdeb-4119-97a3-a5a3571bd641.mha", True),
    ("ACOUSLIC", "masks/stacked_fetal_abdomen/0199616b-bdeb-4119-97a3-a5a3571bd641.mha", False),
    ("regPro", "train/us_images/case000001.nii.gz", True),
    ("regPro", "train/us_labels/case000001.nii.gz", False),
    ("regPro", "val/mr_images/case000001.nii.gz", False),
    ("regPro", "val/mr_labels/case000001.nii.gz", False),
    ("Thyroid US Cineclip", "dataset.hdf5", True),
    ("kidneyUS", "images/100_IM-0246-0030_anon.png", True),
    ("kidneyUS", "labels/100_IM-0246-0030_anon.png", False),
]


@pytest.mark.parametrize("name, path, kept", LAYOUT_CASES)
def test_layout_rules_keep_images_and_drop_masks(name, path, kept):
    assert (find_entry(name).exclusion_reason(path) is None) is kept


@pytest.mark.parametrize(
    "path, kept",
    [
        ("benign/benign (1).png", True),
        ("benign/benign (1)_mask.png", False),
        ("benign/benign (1)_mask_1.png", False),
        ("scan_gt.png", False),
        ("x/Masks/scan.png", False),
        ("labels/scan.png", False),
        ("Annotations/scan.png", False),
        ("scan_Annotation.png", False),
        ("videos/clip.avi", True),
    ],
)
def test_generic_rules_for_unknown_folders(path, kept):
    entry = generic_entry("Dataset_BUSI_with_GT")
    assert not entry.has_layout_rules
    assert (entry.exclusion_reason(path) is None) is kept


@pytest.mark.parametrize(
    "name, path, group",
    [
        ("BUS-BRA", "BUSBRA/Images/bus_0042-r.png", "0042"),
        ("FETAL_PLANES_DB", "Images/Patient01234_Plane3_2_of_4.png", "Patient01234"),
        ("CAMUS_public", "database_nifti/patient0007/patient0007_2CH_ES.nii.gz", "patient0007"),
        ("EchoNet-Dynamic", "Videos/0X1A.avi", "0X1A"),
        ("ACOUSLIC", "images/stacked_fetal_ultrasound/abc-1.mha", "abc-1"),
        ("regPro", "train/us_images/case000003.nii.gz", "case000003"),
        ("kidneyUS", "100_IM-0246-0030_anon.png", "100"),
        ("MMOTU-2D", "OTU_2d/images/1.JPG", None),
    ],
)
def test_group_ids(name, path, group):
    assert find_entry(name).group_of(path) == group


def test_group_regex_needs_a_capture_group():
    with pytest.raises(ValueError, match="capture group"):
        DatasetEntry("x", "", "", (), False, group_regex=r"\d+")


def test_cli_list_and_show(capsys):
    assert main(["datasets", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 47 and "BUS-BRA" in lines[12] and "yes" in lines[12]
    assert main(["datasets", "list", "--held-out"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert main(["datasets", "show", "acouslic-ai"]) == 0
    out = capsys.readouterr().out
    assert "images/stacked_fetal_ultrasound/*.mha" in out and "SAME names" in out
    assert main(["datasets", "show", "no-such-set"]) == 2
    assert "not an OpenUS-46 dataset" in capsys.readouterr().err
