"""Inference and reader throughput, as ratios measured in one run (machines are noisy).

ViT-B/16 at 224, batch 16, fp32 on CPU:
  * ``extract_features`` (on preprocessed pixel_values, and from PIL images incl. preprocessing)
    vs timm ``forward_features`` vs stock ``ViTMAEModel`` (all 196 patches kept), in images/s;
  * achieved FLOP/s of ``extract_features`` vs a matmul peak (the best of square and ViT-B-shaped fp32
    ``torch.mm``) measured here.
  Target: >= 1.0x timm; stretch: >= 90% of the matmul peak.
Readers: frames/s on one core of ``load_frames`` for PNG and for DICOM (uncompressed, JPEG 2000,
JPEG baseline cine).

Weights are random (throughput does not depend on them). Run: ``python benchmarks/bench_inference.py``
(about two minutes on 2 cores; ``--iterations`` trades time for steadier numbers).
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


def bench_models(batch: int, iterations: int) -> dict[str, float]:
    from timm.models.vision_transformer import VisionTransformer
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from usfmae_hf.image.processor import build_image_processor
    from usfmae_hf.inference.features import extract_features, load_encoder

    torch.manual_seed(0)
    pixel_values = torch.randn(batch, 3, 224, 224)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(batch)]
    with tempfile.TemporaryDirectory() as directory:
        config = ViTMAEConfig(layer_norm_eps=1e-6, mask_ratio=0.0)
        ViTMAEForPreTraining(config).save_pretrained(directory)
        build_image_processor().save_pretrained(directory)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument(
        "--iterations", type=int, default=2, help="timed repetitions after a warm-up; best is kept (default: 2)"
    )
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch_size}")
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
            f"  {name:55s} {rate:6.2f} img/s  {rate / timm_rate:5.2f}x timm  {rate * flops / peak:6.1%} of matmul peak"
        )
    # The readers are single-threaded Python: frames/s in this process is frames/s per core.
    torch.set_num_threads(1)
    for name, rate in bench_readers(args.iterations).items():
        print(f"  reader {name:48s} {rate:7.1f} frames/s per core")


if __name__ == "__main__":
    main()
