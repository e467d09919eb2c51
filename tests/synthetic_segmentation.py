"""Synthetic ultrasound-like scans with known lesion masks, written in the layouts users unpack.

A scan is Rayleigh-distributed speckle (the amplitude statistics of fully developed ultrasound speckle)
with a grain of about two pixels, and each lesion an ellipse whose speckle is brighter (3x the
background's Rayleigh scale) or darker (1/4 of it): a contrast any segmentation model learns within
a few steps. Every writer is seeded (same arguments, same bytes), keeps images small (48-96 px) and
returns the folder to hand to the loader. Import from tests with ``from synthetic_segmentation import
...`` (``tests/`` is on ``sys.path`` under pytest, as for ``hub_server``).

The true label-id mask of every image is written to ``<returned folder>/.truth/<id>.png`` (mode ``L``;
a hidden folder no loader reads); :func:`truth` reads it. For outlines (HC18) it is the solid ellipse
the outline was drawn from, computed analytically, not by filling.

Writers (``root`` is created if needed):

* :func:`write_generic` - ``train/``, ``validation/``, ``test/`` each with ``images/`` + ``masks/``;
* :func:`write_busbra` - BUS-BRA: ``Images/``, ``Masks/`` (0/255), ``bus_data.csv``, ``5-fold-cv.csv``,
  ``10-fold-cv.csv`` (patient-disjoint test folds, image-level validation columns);
* :func:`write_busi` - BUSI class folders with ``_mask.png`` and, for some images, ``_mask_1.png``;
* :func:`write_mmotu` - MMOTU-2D ``OTU_2d/``: colour annotations, ``_binary`` (0/1) and
  ``_binary_binary`` (0/255) masks, ``train.txt``/``val.txt`` and the ``*_cls.txt`` class lists;
* :func:`write_hc18` - HC18 ``training_set/`` with outline annotations and the pixel-size CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

#: Rayleigh scale of a lesion relative to the background's
CONTRAST = {"bright": 3.0, "dark": 0.25}
BACKGROUND_SCALE = 30.0

#: MMOTU-2D colour of tumour class k (0-based, release order) in annotations/<id>.PNG; background is black
MMOTU_COLOURS = [(64, 0, 0), (0, 64, 0), (0, 0, 64), (64, 0, 64), (64, 64, 0), (64, 64, 64), (0, 128, 0), (0, 0, 128)]


def ellipse(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float], angle: float) -> np.ndarray:
    """Boolean ``H x W`` mask of the pixels whose centres lie in the ellipse (row/col centre, semi-axes, radians)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(float)
    dy, dx = rows - centre[0], cols - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0


def random_ellipse(shape: tuple[int, int], rng: np.random.Generator, extent: tuple[float, float] = (0.15, 0.3)):
    """An ellipse inside the image: semi-axes ``extent`` x the shorter side, kept clear of the border."""
    side = min(shape)
    axes = tuple(rng.uniform(*extent, size=2) * side)
    margin = max(axes) + 2
    centre = (rng.uniform(margin, shape[0] - margin), rng.uniform(margin, shape[1] - margin))
    return ellipse(shape, centre, axes, rng.uniform(0, np.pi))


def speckle_scan(labels: np.ndarray, rng: np.random.Generator, lesion: str = "bright") -> np.ndarray:
    """uint8 speckle scan of a label map: Rayleigh speckle whose scale is the background's times
    ``CONTRAST[lesion] ** (1 + (k - 1) / 4)`` in label ``k > 0``.

    Labels above 1 get increasingly strong contrast, so multi-class maps stay learnable.
    """
    scale = np.where(labels > 0, BACKGROUND_SCALE * CONTRAST[lesion] ** (1 + (labels - 1) / 4), BACKGROUND_SCALE)
    amplitude = rng.rayleigh(1.0, labels.shape) * scale
    return np.clip(ndimage.gaussian_filter(amplitude, 0.7), 0, 255).astype(np.uint8)


def truth(folder: Path, image_id: str) -> np.ndarray:
    """The true label-id mask the writer recorded for ``image_id`` in ``folder`` (a writer's return value)."""
    return np.asarray(Image.open(Path(folder) / ".truth" / f"{image_id}.png")).astype(np.int64)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record(folder: Path, image_id: str, labels: np.ndarray) -> None:
    _save(folder / ".truth" / f"{image_id}.png", labels.astype(np.uint8))


def write_generic(
    root: Path,
    n_train: int,
    n_val: int,
    size: int = 64,
    seed: int = 0,
    *,
    n_test: int = 0,
    n_classes: int = 2,
    scale_255: bool = False,
    lesion: str = "bright",
) -> Path:
    """``root/{train,validation,test}/{images,masks}/scan_<split>_<i>.png``; returns ``root``.

    One elliptical lesion per scan, ``size`` high and ``size``, ``size + 8`` or ``size + 16`` wide.
    Binary masks (``n_classes=2``) hold 0/1, or 0/255 with ``scale_255``; with more classes scan ``i``'s
    lesion has label ``1 + i % (n_classes - 1)``, and every third scan a second, smaller lesion with
    the next label.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", n_train), ("validation", n_val), ("test", n_test)):
        for i in range(count):
            shape = (size, size + 8 * (i % 3))
            labels = random_ellipse(shape, rng).astype(np.uint8) * (1 + i % (n_classes - 1))
            if n_classes > 2 and i % 3 == 0:
                second = random_ellipse(shape, rng, extent=(0.08, 0.12)) & (labels == 0)
                labels[second] = 1 + (i + 1) % (n_classes - 1)
            image_id = f"scan_{split}_{i:03d}"
            _save(root / split / "images" / f"{image_id}.png", speckle_scan(labels, rng, lesion))
            stored = labels * 255 if scale_255 and n_classes == 2 else labels
            _save(root / split / "masks" / f"{image_id}.png", stored.astype(np.uint8))
            _record(root, image_id, labels)
    return root


def write_busbra(root: Path, n_patients: int, size: int = 64, seed: int = 0, lesion: str = "dark") -> Path:
    """BUS-BRA as released, in ``root/BUSBRA``; returns that folder.

    Patient (``Case``) ``c`` has one image (``bus_000c-s``) when ``c % 3 == 0``, else a left and a right
    one; pathology is malignant when ``c % 4 == 0``. Test fold ``(c % k) + 1`` of the k-fold CSVs (so
    test folds are patient-disjoint); the CSVs' image-level ``valid_j`` columns put the right image of
    odd patients in validation, splitting those patients as the real CSVs do. Masks are 0/255. Use
    ``n_patients >= 10`` so that every one of 5 folds holds patients.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "BUSBRA"
    rows = []
    for case in range(1, n_patients + 1):
        for side in ["s"] if case % 3 == 0 else ["l", "r"]:
            image_id = f"bus_{case:04d}-{side}"
            shape = (size, size + 8 * (len(rows) % 3))
            labels = random_ellipse(shape, rng).astype(np.uint8)
            _save(folder / "Images" / f"{image_id}.png", speckle_scan(labels, rng, lesion))
            _save(folder / "Masks" / f"mask_{case:04d}-{side}.png", labels * 255)
            _record(folder, image_id, labels)
            rows.append((image_id, case, "malignant" if case % 4 == 0 else "benign", side, shape))
    with open(folder / "bus_data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX"])
        sides = {"l": "left", "r": "right", "s": "single"}
        for image_id, case, pathology, side, (height, width) in rows:
            writer.writerow(
                [image_id, case, "Fibroadenoma", pathology, 4, "GE", width, height, sides[side], "[1,2,9,8]"]
            )
    for n_folds in (5, 10):
        with open(folder / f"{n_folds}-fold-cv.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ID", "Pathology", "kFold", *(f"valid_{k}" for k in range(1, n_folds + 1))])
            for image_id, case, pathology, side, _ in rows:
                fold = (case % n_folds) + 1
                valid = ["" if k == fold else (0 if side == "r" and case % 2 else 1) for k in range(1, n_folds + 1)]
                writer.writerow([image_id, pathology, fold, *valid])
    return folder


def write_busi(root: Path, n_per_class: int = 4, size: int = 64, seed: int = 0) -> Path:
    """BUSI as released, in ``root/Dataset_BUSI_with_GT``; returns that folder.

    ``<class> (N).png`` with ``<class> (N)_mask.png`` (0/255) in ``benign``, ``malignant`` and ``normal``
    (empty masks). Every image ``N % 3 == 1`` of benign/malignant has a second lesion in ``_mask_1.png``;
    the truth is the union. Malignant masks are saved as RGB with equal channels.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "Dataset_BUSI_with_GT"
    for category in ("benign", "malignant", "normal"):
        for n in range(1, n_per_class + 1):
            shape = (size, size + 8 * (n % 2))
            masks = [] if category == "normal" else [random_ellipse(shape, rng, extent=(0.1, 0.2))]
            if masks and n % 3 == 1:
                masks.append(random_ellipse(shape, rng, extent=(0.08, 0.15)))
            union = np.zeros(shape, np.uint8)
            for mask in masks:
                union |= mask.astype(np.uint8)
            stem = f"{category} ({n})"
            _save(folder / category / f"{stem}.png", speckle_scan(union, rng, "dark"))
            for k, mask in enumerate(masks or [union.astype(bool)]):
                stored = mask.astype(np.uint8) * 255
                if category == "malignant":
                    stored = np.repeat(stored[..., None], 3, axis=2)
                _save(folder / category / f"{stem}_mask{'' if k == 0 else f'_{k}'}.png", stored)
            _record(folder, stem, union)
    return folder


def write_mmotu(root: Path, n_train: int, n_test: int, size: int = 64, seed: int = 0) -> Path:
    """MMOTU-2D as released, in ``root/OTU_2d``; returns that folder.

    Images ``images/<i>.JPG`` (RGB JPEG, ``i`` = 1..n) of tumour class ``(i - 1) % 8``; the colour
    annotation ``annotations/<i>.PNG`` paints the lesion with :data:`MMOTU_COLOURS`, ``<i>_binary.PNG``
    holds 0/1 and ``<i>_binary_binary.PNG`` 0/255. ``train.txt``/``val.txt`` list bare ids (the first
    ``n_train`` / the next ``n_test``), ``train_cls.txt``/``val_cls.txt`` ``<i>.JPG  <class>``. The truth
    holds the 8-class ids (class + 1).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "OTU_2d"
    lists: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
    for i in range(1, n_train + n_test + 1):
        tumour = (i - 1) % 8
        shape = (size, size + 8 * (i % 3))
        lesion = random_ellipse(shape, rng)
        grey = speckle_scan(lesion.astype(np.uint8), rng)
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(_mkdir(folder / "images") / f"{i}.JPG", "JPEG")
        colour = np.zeros((*shape, 3), np.uint8)
        colour[lesion] = MMOTU_COLOURS[tumour]
        _save(folder / "annotations" / f"{i}.PNG", colour)
        _save(folder / "annotations" / f"{i}_binary.PNG", lesion.astype(np.uint8))
        _save(folder / "annotations" / f"{i}_binary_binary.PNG", lesion.astype(np.uint8) * 255)
        _record(folder, str(i), lesion.astype(np.uint8) * (tumour + 1))
        lists["train" if i <= n_train else "val"].append((i, tumour))
    for split, entries in lists.items():
        (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i, _ in entries))
        (folder / f"{split}_cls.txt").write_text("".join(f"{i}.JPG  {label}\n" for i, label in entries))
    return folder


def write_hc18(
    root: Path, n_patients: int, size: int = 96, seed: int = 0, *, with_csv: bool = True, n_cut: int = 0
) -> Path:
    """HC18's training set in ``root/training_set`` (CSV in ``root``); returns ``root``.

    Patient ``p`` (``000``, ``001``, ...) has ``ppp_HC.png`` and, when ``p % 3 == 1``, ``ppp_2HC.png``
    from the same examination. ``*_Annotation.png`` holds the head's one-pixel outline (255 on black)
    with a two-pixel gap; the truth is the solid analytic ellipse. The images are ``size`` wide and
    ``3/4 size`` high. The last ``n_cut`` patients' heads extend past the left border, so their
    outlines enclose nothing. ``training_set_pixel_size_and_HC.csv`` (``filename,pixel size(mm),head
    circumference (mm)``) is written with ``with_csv``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    folder = root / "training_set"
    shape = (size * 3 // 4, size)
    rows = []
    for patient in range(n_patients):
        for suffix in ["", "2"] if patient % 3 == 1 else [""]:
            axes = (rng.uniform(0.3, 0.42) * size, rng.uniform(0.22, 0.3) * size)
            centre = (shape[0] / 2 + rng.uniform(-3, 3), shape[1] / 2 + rng.uniform(-5, 5))
            if patient >= n_patients - n_cut:
                centre = (centre[0], axes[0] * 0.6)
            head = ellipse(shape, centre, axes, rng.uniform(-0.4, 0.4))
            outline = head & ~ndimage.binary_erosion(head, border_value=1)  # no outline along the border
            rows_, cols_ = np.nonzero(outline)
            gap = np.argsort(cols_ + rows_ * 0.01)[-2:]  # two pixels at the right end
            outline[rows_[gap], cols_[gap]] = False
            stem = f"{patient:03d}_{suffix}HC"
            labels = head.astype(np.uint8)
            image = speckle_scan(labels, rng, "dark")
            image[ndimage.binary_dilation(outline)] = 230  # bright skull
            _save(folder / f"{stem}.png", image)
            _save(folder / f"{stem}_Annotation.png", outline.astype(np.uint8) * 255)
            _record(root, stem, labels)
            spacing = float(np.round(rng.uniform(0.1, 0.3), 6))
            a, b = axes
            circumference = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b))) * spacing
            rows.append((f"{stem}.png", spacing, round(float(circumference), 2)))
    if with_csv:
        with open(root / "training_set_pixel_size_and_HC.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "pixel size(mm)", "head circumference (mm)"])
            writer.writerows(rows)
    return root
