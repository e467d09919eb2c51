"""The OpenUS-46 catalogue: the 46 public ultrasound datasets USF-MAE was pretrained and evaluated on.

The list itself (name, anatomy, access link, file formats, held-out flag) ships as
``usfmae_hf/openus46.csv``. Where a dataset's unpacked layout is known, :data:`_LAYOUT_RULES` says which
files are ultrasound images, which are masks, labels or other modalities, and how a patient (group)
id is read off a path. Datasets without such rules, and folders that are not in the catalogue at all,
are ingested with :data:`GENERIC_EXCLUDE_GLOBS` / :data:`GENERIC_SKIP_DIRS`, which already keep the
usual ``*_mask*``, ``*_gt*`` and ``*Annotation*`` files out.

Path patterns are matched case-insensitively against the *end* of a file's path relative to the
dataset folder, with :meth:`pathlib.PurePath.match` semantics (``*`` never crosses ``/``): the pattern
``Images/bus_*.png`` matches ``BUSBRA/Images/bus_0001-l.png``.
"""

from __future__ import annotations

import csv
import difflib
import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath

from usfmae_hf.errors import UsfmaeError

__all__ = [
    "GENERIC_EXCLUDE_GLOBS",
    "GENERIC_SKIP_DIRS",
    "DatasetEntry",
    "find_entry",
    "generic_entry",
    "load_catalogue",
    "normalize_name",
]

#: File-name patterns that are never ultrasound images, whatever the dataset.
GENERIC_EXCLUDE_GLOBS: tuple[str, ...] = ("*_mask*", "mask_*", "*_gt*", "*annotation*", "*_binary*", "*_label*")
#: Folder names whose content is never ultrasound images, whatever the dataset.
GENERIC_SKIP_DIRS: tuple[str, ...] = (
    "masks",
    "mask",
    "labels",
    "label",
    "annotations",
    "annotation",
    "gt",
    "ground_truth",
    "groundtruth",
)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the catalogue and the rules that ingest it.

    Attributes:
        name: the catalogue name (``BUS-BRA``); folders are matched to it by :func:`normalize_name`.
        anatomy: body part or application.
        link: where the dataset is published (downloads are up to the user).
        formats: file formats of the release (``PNG``, ``DICOM``, ``NIfTI`` ...).
        held_out: reserved for downstream evaluation (BUS-BRA, MMOTU-2D, GIST514-DB): never pretrained on.
        id: row number in the OpenUS-46 table; ``None`` for a folder outside the catalogue.
        aliases: other names the unpacked folder commonly has (``HC18`` for ``HC``).
        image_globs: patterns a file must match to be an image candidate (``("*",)``: any supported file).
        exclude_globs: patterns of files to skip, on top of :data:`GENERIC_EXCLUDE_GLOBS`.
        skip_dirs: folder names to skip (other modalities, label maps), on top of :data:`GENERIC_SKIP_DIRS`.
        group_regex: regular expression searched in the relative POSIX path; its first capture group is
            the patient/group id. ``None``: no group id is known.
        notes: how the layout was established, or what is not verified.
    """

    name: str
    anatomy: str
    link: str
    formats: tuple[str, ...]
    held_out: bool
    id: int | None = None
    aliases: tuple[str, ...] = ()
    image_globs: tuple[str, ...] = ("*",)
    exclude_globs: tuple[str, ...] = ()
    skip_dirs: tuple[str, ...] = ()
    group_regex: str | None = None
    notes: str = ""
    _group_pattern: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.group_regex is not None:
            pattern = re.compile(self.group_regex)
            if pattern.groups < 1:
                raise ValueError(f"{self.name}: group_regex {self.group_regex!r} needs a capture group")
            object.__setattr__(self, "_group_pattern", pattern)

    @property
    def has_layout_rules(self) -> bool:
        """Whether the dataset has rules of its own (else only the generic ones apply)."""
        return self.image_globs != ("*",) or bool(self.exclude_globs or self.skip_dirs or self.group_regex)

    def exclusion_reason(self, relative_path: str) -> str | None:
        """Why the file at ``relative_path`` (POSIX, relative to the dataset folder) is not an image, or ``None``."""
        path = PurePosixPath(relative_path.lower())
        for folder in path.parts[:-1]:
            if folder in GENERIC_SKIP_DIRS or folder in (d.lower() for d in self.skip_dirs):
                return f"folder {folder!r}"
        for pattern in (*GENERIC_EXCLUDE_GLOBS, *self.exclude_globs):
            if path.match(pattern.lower()):
                return f"pattern {pattern!r}"
        if not any(path.match(pattern.lower()) for pattern in self.image_globs):
            return "not an image of this dataset"
        return None

    def group_of(self, relative_path: str) -> str | None:
        """The patient/group id read off ``relative_path`` by :attr:`group_regex`, or ``None``."""
        if self._group_pattern is None:
            return None
        match = self._group_pattern.search(relative_path)
        return match.group(1) if match else None


# Layouts read off copies of the real files or the datasets' official loaders.
_LAYOUT_RULES: dict[str, dict] = {
    "BUS-BRA": dict(
        aliases=("BUSBRA",),
        image_globs=("Images/bus_*.png",),
        group_regex=r"bus_(\d+)-[lrs]",
        notes="Images/bus_NNNN-{l,r,s}.png beside Masks/mask_*.png; NNNN is the patient (Case).",
    ),
    "MMOTU-2D": dict(
        aliases=("OTU_2d",),
        image_globs=("images/*.jpg",),
        notes="OTU_2d/images/<id>.JPG; annotations/ holds <id>.PNG and *_binary*.PNG masks. No patient ids.",
    ),
    "GIST514-DB": dict(
        aliases=("usd514_jpeg_roi", "GIST514"),
        image_globs=("images/*.jpg",),
        notes="usd514_jpeg_roi/images/*.jpg with COCO files in annotations/. Patient ids unverified.",
    ),
    "FETAL_PLANES_DB": dict(
        aliases=("FETAL_PLANES_ZENODO",),
        image_globs=("Images/*.png",),
        group_regex=r"(Patient\d+)_",
        notes="Images/PatientNNNNN_PlaneN_M_of_K.png + FETAL_PLANES_DB_data.csv (semicolons).",
    ),
    "HC": dict(
        aliases=("HC18",),
        image_globs=("*.png",),
        notes="training_set/NNN_HC.png with NNN_HC_Annotation.png beside it.",
    ),
    "CAMUS_public": dict(
        aliases=("CAMUS",),
        image_globs=("*.nii.gz", "*.nii", "*.mhd"),
        group_regex=r"(patient\d+)",
        notes="database_nifti/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES,half_sequence}.nii.gz, *_gt beside them.",
    ),
    "EchoNet-Dynamic": dict(
        aliases=("EchoNet_Dynamic",),
        image_globs=("Videos/*.avi",),
        group_regex=r"([^/]+)\.avi$",
        notes="Videos/<FileName>.avi (112x112) + FileList.csv; one video per patient.",
    ),
    "ACOUSLIC": dict(
        aliases=("ACOUSLIC-AI", "acouslic_ai"),
        image_globs=("images/stacked_fetal_ultrasound/*.mha",),
        group_regex=r"([^/]+)\.mha$",
        notes="masks/stacked_fetal_abdomen/<uuid>.mha has the SAME names as the images: only images/ is read.",
    ),
    "regPro": dict(
        aliases=("mu-RegPro", "μ-RegPro", "muRegPro"),
        image_globs=("us_images/*.nii.gz", "us_images/*.nii"),
        skip_dirs=("us_labels", "mr_images", "mr_labels"),
        group_regex=r"([^/]+)\.nii(?:\.gz)?$",
        notes="{train,val}/{us_images,us_labels,mr_images,mr_labels}/<case>.nii.gz: only us_images is ultrasound.",
    ),
    "Thyroid US Cineclip": dict(
        aliases=("Thyroid cineclip", "thyroid_cineclip"),
        image_globs=("*.h5", "*.hdf5"),
        notes="One HDF5 file (annot_id, frame_num, image, mask) + metadata.csv; reading needs h5py.",
    ),
    "kidneyUS": dict(
        image_globs=("*.png",),
        group_regex=r"(?:^|/)(\d+)_[^/]*$",
        notes="PNGs like 100_IM-0246-0030_anon.png; the leading integer as patient id is unverified.",
    ),
}


def normalize_name(name: str) -> str:
    """Lower-case ``name`` and drop everything but letters and digits (``BUS-BRA`` -> ``busbra``)."""
    return "".join(char for char in name.lower() if char.isalnum())


@functools.cache
def load_catalogue() -> tuple[DatasetEntry, ...]:
    """The 46 OpenUS-46 entries, in table order, with their layout rules where known."""
    text = resources.files("usfmae_hf.ingest").joinpath("openus46.csv").read_text(encoding="utf-8")
    entries = []
    for row in csv.DictReader(text.splitlines()):
        entries.append(
            DatasetEntry(
                name=row["name"],
                anatomy=row["anatomy"],
                link=row["link"],
                formats=tuple(fmt.strip() for fmt in row["formats"].split(";") if fmt.strip()),
                held_out=row["held_out_for_evaluation"].strip().lower() == "yes",
                id=int(row["id"]),
                **_LAYOUT_RULES.get(row["name"], {}),
            )
        )
    return tuple(entries)


@functools.cache
def _entries_by_key() -> dict[str, DatasetEntry]:
    index: dict[str, DatasetEntry] = {}
    for entry in load_catalogue():
        for key in (entry.name, *entry.aliases):
            index.setdefault(normalize_name(key), entry)
    return index


def find_entry(name: str, *, required: bool = False) -> DatasetEntry | None:
    """The catalogue entry called ``name`` (or one of its aliases), compared case- and punctuation-insensitively.

    Raises:
        UsfmaeError: ``required`` and no entry matches (the message suggests close names).
    """
    entry = _entries_by_key().get(normalize_name(name))
    if entry is None and required:
        by_key = {normalize_name(e.name): e.name for e in load_catalogue()}
        close = [by_key[k] for k in difflib.get_close_matches(normalize_name(name), by_key, n=3, cutoff=0.6)]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `usfmae datasets list`"
        raise UsfmaeError(f"{name!r} is not an OpenUS-46 dataset{hint}")
    return entry


def generic_entry(folder_name: str) -> DatasetEntry:
    """An entry for a folder outside the catalogue: its name is the folder name, only generic rules apply."""
    return DatasetEntry(name=folder_name, anatomy="unknown", link="", formats=(), held_out=False)
