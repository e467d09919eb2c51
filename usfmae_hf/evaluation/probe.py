"""Frozen-feature baselines: a linear probe and a cosine k-NN on USF-MAE encoder features.

The encoder never trains: features come from :func:`usfmae_hf.inference.features.extract_features`, the
classifier from scikit-learn. ``linear`` standardises the features (as the MAE linear probe's
``BatchNorm(affine=False)``) and fits a multinomial logistic regression; ``knn`` votes among the
``k`` nearest training images by cosine distance. Outputs are those of fine-tuning:
``all_results.json``, ``{split}_predictions.csv``, ``{split}_confusion_matrix.png``, ``{split}_roc.png``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from usfmae_hf.atomic import atomic_directory
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation.labelled import EVAL_SPLITS, check_labels, drop_unreadable, load_labelled_images
from usfmae_hf.evaluation.reporting import evaluate_split, flatten_results, write_results

Method = Literal["linear", "knn"]
METHODS: tuple[str, ...] = ("linear", "knn")


def build_probe(method: Method, *, k: int = 20, c: float = 1.0, max_iter: int = 2000, seed: int = 0):
    """The scikit-learn pipeline of ``method`` (unfitted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if method == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    if method == "knn":
        return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    raise ValueError(f"unknown probe method {method!r}; choose one of {', '.join(METHODS)}")


def class_probabilities(probe, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``predict_proba`` widened to every class: classes the probe never saw get probability 0."""
    probabilities = np.zeros((len(features), num_classes))
    probabilities[:, probe.classes_] = probe.predict_proba(features)
    return probabilities


def run_probe(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    method: Method = "linear",
    data: Mapping[str, Any],
    pooling: str = "cls",
    k: int = 20,
    c: float = 1.0,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str = "auto",
    skip_unreadable: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract frozen features of every split, fit the probe on train, score validation and test.

    ``data`` holds the keyword arguments of :func:`usfmae_hf.finetuning.data.load_labelled_images`
    (``train_dir``/``validation_dir``/``test_dir``, ``dataset_name``, or ``task``/``data_root``/``fold``).
    ``dtype`` is the encoder's precision (``auto``, ``fp32``, ``bf16``, ``fp16``; see
    :func:`usfmae_hf.precision.choose_precision`), recorded in the results as ``dtype`` and ``precision``.
    Returns the flat results written to ``all_results.json``; a split lacking a class is flagged in
    ``{split}_warnings`` (see :func:`usfmae_hf.evaluation.reporting.absent_class_warnings`). ``progress`` shows
    the bars of the image check.
    """
    from usfmae_hf.inference.features import extract_features, load_encoder
    from usfmae_hf.precision import choose_precision

    dataset = drop_unreadable(load_labelled_images(**data), skip=skip_unreadable, progress=progress)
    label_names = check_labels(dataset)
    if not any(split in dataset for split in EVAL_SPLITS):
        raise UsfmaeError("probing needs a validation or test split to score")
    if method == "knn" and k > len(dataset["train"]):
        raise UsfmaeError(f"k={k} exceeds the {len(dataset['train'])} training images")
    precision = choose_precision(dtype, device)
    encoder = load_encoder(model, device=device, dtype=precision.dtype)
    features = {
        split: extract_features(encoder, (row["image"] for row in ds), pooling=pooling, batch_size=batch_size).numpy()
        for split, ds in dataset.items()
    }
    probe = build_probe(method, k=k, c=c, seed=seed).fit(features["train"], dataset["train"]["label"])
    results: dict[str, Any] = {
        "method": method,
        "pooling": pooling,
        "model": str(model),
        "dtype": precision.name,
        "precision": str(precision),
    }
    results.update({"k": k} if method == "knn" else {"C": c})
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        for split in EVAL_SPLITS:
            if split in dataset:
                report = evaluate_split(
                    staging,
                    split,
                    probabilities=class_probabilities(probe, features[split], len(label_names)),
                    labels=dataset[split]["label"],
                    ids=dataset[split]["id"],
                    label_names=label_names,
                )
                results.update(flatten_results(split, report))
        write_results(staging, results)
    return results
