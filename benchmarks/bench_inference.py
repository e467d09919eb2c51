"""Inference and reader throughput, as ratios measured in one run (machines are noisy).

ViT-B/16 at 224, batch 16, fp32 on CPU:
  * ``extract_features`` (on preprocessed pixel_values, and from PIL images incl. preprocessing)
    vs timm ``forward_features`` vs stock ``ViTMAEModel`` (all 196 patches kept), in images/s;
  * achieved FLOP/s of ``extract_features`` vs a matmul peak (the best of square and ViT-B-shaped fp32
    ``torch.mm``) measured here.
  Target: >= 1.0x timm; stretch: >= 90% of the matmul peak.
Readers: frames/s on one core of ``load_frames`` for PNG and for DICOM (uncompressed, JPEG 2000,
JPEG baseline cine).

Precision (``--dtype auto`` of the inference commands): the CPU, the capability detected
(:mod:`usfmae_hf.precision`), and bf16 against fp32 on real pydicom-data ultrasound frames, for the
quickstart's small MAE and for ViT-B/16: feature cosine similarity (min over frames, CLS and patch
tokens) and max abs difference, and the bf16/fp32 throughput ratio of ``extract_features``.

Weights are random (throughput does not depend on them). Run: ``python benchmarks/bench_inference.py``
(a few minutes on 2 cores; ``--iterations`` trades time for steadier numbers, ``--sections`` picks parts).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usfmae_hf.precision import cpu_name


def best_seconds(function: Callable[[], object], iterations: int) -> float:
    """Fastest of ``iterations`` timed calls after one warm-up call."""
    return interleaved_best_seconds({"f": function}, iterations)["f"]


def interleaved_best_seconds(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Fastest call of each function over ``rounds`` round-robin rounds (after a warm-up round).

    Taking turns spreads the load of other processes on a shared machine evenly over the contenders.
    """
    best = dict.fromkeys(functions, float("inf"))
    for round_index in range(rounds + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_index:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def vit_forward_flops(
    image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, mlp: int = 3072
) -> float:
    """Multiply-add FLOPs (2 per MAC) of one ViT encoder forward pass (patch embedding + blocks)."""
    tokens = (image_size // patch) ** 2 + 1
    patch_embed = (tokens - 1) * (3 * patch * patch) * dim
    per_block = tokens * (4 * dim * dim + 2 * dim * mlp) + 2 * tokens * tokens * dim
    return 2.0 * (patch_embed + depth * per_block)


# Square GEMMs and ViT-B's own MLP GEMMs at batch 16 (16 x 197 tokens): the best of them is the peak.
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (16 * 197, 768, 3072), (16 * 197, 3072, 768))


def matmul_peak(iterations: int) -> float:
    rates = []
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2.0 * m * k * n / best_seconds(lambda a=a, b=b: torch.mm(a, b), iterations))
    return max(rates)


def random_model_directory(directory: str, **config_kwargs) -> str:
    """Save a random-weight ViTMAE (ViT-B/16 by default) with its USF-MAE processor in ``directory``."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from usfmae_hf.image.processor import build_image_processor

    torch.manual_seed(0)
    config = ViTMAEConfig(**{"layer_norm_eps": 1e-6, "mask_ratio": 0.0, **config_kwargs})
    ViTMAEForPreTraining(config).save_pretrained(directory)
    build_image_processor(config.image_size).save_pretrained(directory)
    return directory


def bench_models(batch: int, iterations: int) -> dict[str, float]:
    from timm.models.vision_transformer import VisionTransformer
    from transformers import ViTMAEForPreTraining

    from usfmae_hf.inference.features import extract_features, load_encoder

    torch.manual_seed(0)
    pixel_values = torch.randn(batch, 3, 224, 224)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(batch)]
    with tempfile.TemporaryDirectory() as directory:
        random_model_directory(directory)
        encoder = load_encoder(directory)
        stock = ViTMAEForPreTraining.from_pretrained(directory).vit.eval()  # stock ViTMAEModel
    timm_model = VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=0,
    ).eval()
    noise = torch.arange(196, dtype=torch.float32).expand(batch, -1)

    @torch.inference_mode()
    def run_stock():
        return stock(pixel_values, noise=noise)

    @torch.inference_mode()
    def run_timm():
        return timm_model.forward_features(pixel_values)

    seconds = interleaved_best_seconds(
        {
            "extract_features (pixel_values)": lambda: extract_features(encoder, pixel_values, batch_size=batch),
            "extract_features (PIL 640x480, incl. preprocessing)": lambda: extract_features(
                encoder, images, batch_size=batch
            ),
            "timm forward_features": run_timm,
            "stock ViTMAEModel (mask_ratio 0)": run_stock,
        },
        iterations,
    )
    return {name: batch / value for name, value in seconds.items()}


def ultrasound_frames(count: int) -> list[np.ndarray]:
    """``count`` real ultrasound frames of the pydicom-data DICOMs, taken in turn from each file."""
    from pydicom.data import get_testdata_file

    from usfmae_hf.io import load_frames
    from usfmae_hf.quickstart.runner import ULTRASOUND_DICOMS

    per_file = [
        [frame.image for frame in load_frames(get_testdata_file(name), frame_stride=10)] for name in ULTRASOUND_DICOMS
    ]
    frames = [frames[i] for i in range(max(map(len, per_file))) for frames in per_file if i < len(frames)]
    if len(frames) < count:
        raise SystemExit(f"pydicom-data holds only {len(frames)} ultrasound frames, {count} needed")
    return frames[:count]


def bf16_agreement(fp32: torch.Tensor, bf16: torch.Tensor) -> tuple[float, float]:
    """Min cosine similarity over images and max abs difference of two ``(N, ...)`` feature tensors."""
    a, b = fp32.flatten(1).double(), bf16.flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1).min().item(), (a - b).abs().max().item()


def bench_precision(batch: int, iterations: int) -> dict[str, dict[str, float]]:
    """bf16 against fp32 for the quickstart's small MAE and for ViT-B/16 on real ultrasound frames."""
    from usfmae_hf.inference.features import extract_features, load_encoder, processor_for
    from usfmae_hf.quickstart.runner import SMALL_MAE

    frames = ultrasound_frames(batch)
    results = {}
    for label, config in (("small MAE (quickstart, 64 px)", SMALL_MAE), ("ViT-B/16 (224 px)", {})):
        with tempfile.TemporaryDirectory() as directory:
            random_model_directory(directory, **config)
            fp32, bf16 = load_encoder(directory), load_encoder(directory, dtype=torch.bfloat16)
            pixel_values = processor_for(fp32)(frames, return_tensors="pt")["pixel_values"]
        row = {}
        for pooling in ("cls", "patches"):
            cosine, difference = bf16_agreement(
                extract_features(fp32, pixel_values, pooling, batch_size=batch),
                extract_features(bf16, pixel_values, pooling, batch_size=batch),
            )
            row[f"{pooling} min cosine"], row[f"{pooling} max abs diff"] = cosine, difference
        seconds = interleaved_best_seconds(
            {
                name: lambda encoder=encoder, pixels=pixel_values: extract_features(encoder, pixels, batch_size=batch)
                for name, encoder in (("fp32", fp32), ("bf16", bf16))
            },
            iterations,
        )
        row["fp32 img/s"], row["bf16 img/s"] = batch / seconds["fp32"], batch / seconds["bf16"]
        results[label] = row
    return results


def bench_readers(iterations: int) -> dict[str, float]:
    from pydicom.data import get_testdata_file

    from usfmae_hf.io import load_frames, load_image

    def frames_per_second(paths: list[Path]) -> float:
        counts = []

        def read_all():
            counts.append(sum(1 for path in paths for _ in load_frames(path)))

        seconds = best_seconds(read_all, iterations)
        return counts[-1] / seconds

    results = {}
    with tempfile.TemporaryDirectory() as directory:
        source = load_image(get_testdata_file("US1_UNCR.dcm"))
        pngs = []
        for index in range(20):
            pngs.append(Path(directory) / f"{index}.png")
            source.save(pngs[-1])
        results["PNG 640x480 RGB"] = frames_per_second(pngs)
    for label, name in [
        ("DICOM 640x480 RGB uncompressed", "US1_UNCR.dcm"),
        ("DICOM 640x480 JPEG 2000", "US1_J2KR.dcm"),
        ("DICOM 800x600 palette RLE", "OBXXXX1A_rle.dcm"),
        ("DICOM 640x480 JPEG baseline cine (120 frames)", "color3d_jpeg_baseline.dcm"),
    ]:
        results[label] = frames_per_second([Path(get_testdata_file(name))] * (1 if "cine" in label else 10))
    return results


SECTIONS = ("models", "precision", "readers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument(
        "--iterations", type=int, default=2, help="timed repetitions after a warm-up; best is kept (default: 2)"
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure (default: all)"
    )
    args = parser.parse_args()
    from usfmae_hf.precision import describe_precision

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}; CPU {cpu_name()} "
        f"(torch capability {torch.backends.cpu.get_cpu_capability()}); --dtype auto here: {describe_precision()}"
    )
    if "models" in args.sections:
        print("fp32 throughput:")
        peak = matmul_peak(max(args.iterations, 10))
        flops = vit_forward_flops()
        print(
            f"matmul peak (best of square and ViT-B MLP fp32 GEMMs): {peak / 1e9:.1f} GFLOP/s; "
            f"ViT-B/16 forward: {flops / 1e9:.1f} GFLOP/image"
        )
        rates = bench_models(args.batch_size, args.iterations)
        timm_rate = rates["timm forward_features"]
        for name, rate in rates.items():
            print(
                f"  {name:55s} {rate:6.2f} img/s  {rate / timm_rate:5.2f}x timm  "
                f"{rate * flops / peak:6.1%} of matmul peak"
            )
    if "precision" in args.sections:
        print(f"bf16 vs fp32 (bf16 weights), {args.batch_size} pydicom-data ultrasound frames:")
        for name, row in bench_precision(args.batch_size, args.iterations).items():
            print(
                f"  {name:30s} CLS min cosine {row['cls min cosine']:.6f}, max abs diff {row['cls max abs diff']:.4f}; "
                f"patches min cosine {row['patches min cosine']:.6f}, max abs diff {row['patches max abs diff']:.4f}; "
                f"fp32 {row['fp32 img/s']:.2f} img/s, bf16 {row['bf16 img/s']:.2f} img/s "
                f"({row['bf16 img/s'] / row['fp32 img/s']:.2f}x)"
            )
    if "readers" in args.sections:
        # The readers are single-threaded Python: frames/s in this process is frames/s per core.
        torch.set_num_threads(1)
        for name, rate in bench_readers(args.iterations).items():
            print(f"  reader {name:48s} {rate:7.1f} frames/s per core")


if __name__ == "__main__":
    main()
