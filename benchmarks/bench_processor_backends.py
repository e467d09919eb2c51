"""What the default (torchvision) image-processor backend costs against USF-MAE's exact PIL one.

``AutoImageProcessor.from_pretrained(dir)`` and ``transformers.pipeline(task, model=dir)`` load the
torchvision backend, whose NEAREST resize picks other source pixels than PIL's at non-integer scales;
:func:`usfmae_hf.inference.pipelines.pipeline` and the package's commands use the exact one. On every
frame of the pydicom-data ultrasound files (``ULTRASOUND_DICOMS``: 7 stills and a 120-frame cine):

1. pixels: max / mean absolute difference of ``pixel_values`` (normalised units) at each model size;
2. features: ``pipeline("image-feature-extraction")`` default vs exact (CLS and patch tokens): min and
   mean cosine similarity over frames, max absolute difference, for a random-weight ViT-B/16 (224 px,
   sin-cos position embeddings) and the quickstart's small MAE (64 px);
3. a linear probe (:func:`usfmae_hf.evaluation.probe.build_probe`) on ViT-B CLS features for a labelled
   set of real frames: upright vs vertically flipped, each image a random crop (50-100% of the area,
   aspect 3:4 to 4:3) so that input sizes vary as across real datasets; one crop of each cine frame and
   ``--views`` crops of each distinct still. Two splits: by scan (train on the cine, test on the stills:
   transfer) and by image (random halves: the same scans on both sides, an easier task). Accuracy when
   training and testing with the exact processor, when a probe trained on exact features is served
   through the default backend, and with the default backend throughout; plus the share of test
   predictions that change and the largest change of a predicted probability.

Weights are random (the sensitivity of a trained USF-MAE may differ). Run:
``python benchmarks/bench_processor_backends.py`` (about 14 minutes on 2 busy cores; ``--frame-stride``
and ``--views`` trade coverage for time; ``--json`` saves the numbers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VIT_B = dict(
    image_size=224,
    patch_size=16,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    layer_norm_eps=1e-6,
)


def ultrasound_frames(frame_stride: int) -> dict[str, list[np.ndarray]]:
    """Every ``frame_stride``-th frame of each pydicom-data ultrasound file, by file name."""
    from pydicom.data import get_testdata_file

    from usfmae_hf.io import load_frames
    from usfmae_hf.quickstart.runner import ULTRASOUND_DICOMS

    frames = {}
    for name in ULTRASOUND_DICOMS:
        path = get_testdata_file(name)
        if path is not None:
            frames[name] = [frame.image for frame in load_frames(path, frame_stride=frame_stride)]
    if not frames:
        raise SystemExit("no ultrasound DICOMs found: pip install pydicom-data")
    return frames


def random_encoder_directory(directory: Path, config: dict) -> Path:
    """A random MAE encoder of ``config`` (sin-cos positions) converted to a ``vit`` directory with its processor."""
    from usfmae_hf.model.conversion import convert_checkpoint
    from usfmae_hf.model.reference_mae import ReferenceMAE

    torch.manual_seed(0)
    checkpoint = directory / "encoder.pth"
    torch.save(ReferenceMAE.from_hf_config_kwargs(config, encoder_only=True).state_dict(), checkpoint)
    convert_checkpoint(
        checkpoint, directory / "model", output_format="vit", num_attention_heads=config["num_attention_heads"]
    )
    return directory / "model"


def feature_pipelines(model_dir: Path):
    """``pipeline("image-feature-extraction")`` with the exact processor, and transformers' default-backend one."""
    import transformers

    from usfmae_hf.inference.features import load_encoder
    from usfmae_hf.inference.pipelines import pipeline

    exact = pipeline("image-feature-extraction", model=model_dir)
    default = transformers.pipeline(
        "image-feature-extraction", model=load_encoder(model_dir), image_processor=str(model_dir)
    )
    return exact, default


def tokens(extractor, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    """``(N, tokens, dim)`` float64 outputs of a feature-extraction pipeline."""
    return torch.cat([output for output in extractor(images, batch_size=batch_size, return_tensors=True)]).double()


def agreement(exact: torch.Tensor, default: torch.Tensor) -> dict[str, float]:
    """Cosine similarity (min, mean over images) and max abs difference of CLS and of flattened patch tokens."""
    row = {}
    for name, a, b in (
        ("cls", exact[:, 0], default[:, 0]),
        ("patches", exact[:, 1:].flatten(1), default[:, 1:].flatten(1)),
    ):
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        row[f"{name} cosine min"] = cosine.min().item()
        row[f"{name} cosine mean"] = cosine.mean().item()
        row[f"{name} max abs diff"] = (a - b).abs().max().item()
    return row


def augmented_views(
    frames: list[np.ndarray], views: int, rng: np.random.Generator
) -> tuple[list[Image.Image], list[int]]:
    """``views`` random crops of each frame, each flipped vertically (label 1) or not (label 0) at random."""
    images, labels = [], []
    for frame in frames:
        height, width = frame.shape[:2]
        for _ in range(views):
            area = rng.uniform(0.5, 1.0) * height * width
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            crop_w = int(min(width, round(np.sqrt(area * aspect))))
            crop_h = int(min(height, round(np.sqrt(area / aspect))))
            top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
            image = Image.fromarray(frame[top : top + crop_h, left : left + crop_w])
            label = int(rng.integers(0, 2))
            images.append(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if label else image)
            labels.append(label)
    return images, labels


def distinct_stills(frames: dict[str, list[np.ndarray]], cine: str) -> list[np.ndarray]:
    """The frames of every file but ``cine`` with distinct pixels (pydicom-data holds one scan in several encodings)."""
    from usfmae_hf.io.hashing import pixel_sha256

    distinct = {}
    for name, file_frames in frames.items():
        if name != cine:
            for frame in file_frames:
                distinct.setdefault(pixel_sha256(frame), frame)
    return list(distinct.values())


def probe_agreement(
    features: dict[str, np.ndarray], labels: np.ndarray, train: np.ndarray, test: np.ndarray
) -> dict[str, float]:
    """Linear probes fitted on the ``train`` rows of exact / default features, scored on the ``test`` rows."""
    from usfmae_hf.evaluation.probe import build_probe

    trained = {name: build_probe("linear").fit(features[name][train], labels[train]) for name in features}
    predictions = {
        "exact -> exact": trained["exact"].predict(features["exact"][test]),
        "exact -> default": trained["exact"].predict(features["default"][test]),
        "default -> default": trained["default"].predict(features["default"][test]),
    }
    row = {f"accuracy ({name})": float(np.mean(p == labels[test])) for name, p in predictions.items()}
    row["predictions changed (exact-trained probe, default inputs)"] = float(
        np.mean(predictions["exact -> exact"] != predictions["exact -> default"])
    )
    probabilities = [trained["exact"].predict_proba(features[name][test])[:, 1] for name in ("exact", "default")]
    row["max abs diff of P(flipped)"] = float(np.abs(probabilities[0] - probabilities[1]).max())
    row["train images"], row["test images"] = int(train.sum()), int(test.sum())
    return row


def bench_probe(
    exact, default, frames: dict[str, list[np.ndarray]], views: int, batch_size: int
) -> dict[str, dict[str, float]]:
    """The probe comparison on two splits of one labelled set of crops: by scan, and by image within the scans."""
    rng = np.random.default_rng(0)
    cine = max(frames, key=lambda name: len(frames[name]))
    cine_images, cine_labels = augmented_views(frames[cine], 1, rng)
    still_images, still_labels = augmented_views(distinct_stills(frames, cine), views, rng)
    images = cine_images + still_images
    labels = np.array(cine_labels + still_labels)
    features = {
        name: tokens(extractor, images, batch_size)[:, 0].numpy()
        for name, extractor in (("exact", exact), ("default", default))
    }
    from_cine = np.arange(len(images)) < len(cine_images)
    random_half = rng.permutation(len(images)) < len(images) // 2
    return {
        "by scan (train: cine, test: stills)": probe_agreement(features, labels, from_cine, ~from_cine),
        "by image (random halves, same scans)": probe_agreement(features, labels, random_half, ~random_half),
    }


def main() -> None:
    from usfmae_hf.image.processor import build_image_processor
    from usfmae_hf.inference.pipelines import default_backend_difference
    from usfmae_hf.quickstart.runner import SMALL_MAE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frame-stride", type=int, default=1, help="every n-th cine frame (default: all 120)")
    parser.add_argument("--views", type=int, default=24, help="random crops per distinct still in the probe test set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    start = time.perf_counter()
    frames = ultrasound_frames(args.frame_stride)
    images = [Image.fromarray(frame) for file_frames in frames.values() for frame in file_frames]
    results: dict[str, dict] = {"frames": {name: len(f) for name, f in frames.items()}}
    print(f"{len(images)} frames from {len(frames)} files")

    results["pixels"] = {
        f"{size} px": default_backend_difference(build_image_processor(size), images) for size in (224, 64)
    }
    for size, row in results["pixels"].items():
        print(f"pixel_values at {size}: {row}")

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for index, (label, config) in enumerate(
            (("ViT-B/16 (224 px)", VIT_B), ("quickstart small MAE (64 px)", {**SMALL_MAE, "layer_norm_eps": 1e-6}))
        ):
            (root / str(index)).mkdir()
            exact, default = feature_pipelines(random_encoder_directory(root / str(index), config))
            results[f"features {label}"] = agreement(
                tokens(exact, images, args.batch_size), tokens(default, images, args.batch_size)
            )
            print(f"features {label}: {results[f'features {label}']}")
            if config is VIT_B:
                for split, row in bench_probe(exact, default, frames, args.views, args.batch_size).items():
                    results[f"probe ViT-B/16 CLS, split {split}"] = row
                    print(f"probe ViT-B/16 CLS, split {split}: {row}")
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
