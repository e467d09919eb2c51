"""Inference and reader throughput, as ratios measured in one run (machines are noisy).

Every section times its contenders in turn, round after round (so that the load of other processes falls
on all of them alike), and reports median images/s and, against the reference, the median of the per-round
ratios with their interquartile range: a ratio is taken within one round, so that the machine's speed
drifting between rounds (seen here: 15% within a run) cancels out, and the range says how noisy it was.
Weights are random (throughput does not depend on them); ViT-B/16 at 224, batch 16, on ``--device``
(default CPU).

fp32 (section ``fp32``): ``extract_features`` (fused forward, see :mod:`usfmae_hf.inference.features`) with
CLS pooling (its last block runs for the CLS token only), with patch tokens (the whole forward), from PIL
images incl. preprocessing, with the fp32 linear backend this CPU does not choose (oneDNN or ``torch.mm``,
see ``linear_backend``: the choice, measured where it runs), and with ``fast=False`` (the stock ``ViTModel``
forward), against timm's ``forward_features`` and the stock ``ViTMAEModel`` (all 196 patches kept), in
images/s, as a ratio to timm, as a share of the fp32 matmul peak measured here and, with ``--peak-tflops``,
as MFU. Also the agreement of the fused and the stock forward. Target: >= 1.15x timm.

Precision (section ``precision``; ``--dtype auto`` of the inference commands): the capability detected
(:mod:`usfmae_hf.precision`); for ViT-B/16 the bf16 paths (bf16 weights: fused and stock forward; fp32
weights under bf16 autocast) against timm fp32 in the same rounds (target where AMX exists: >= 3x), and
bf16 against fp32 features on real pydicom-data ultrasound frames: min cosine similarity over frames, max
abs difference and the error's spread over frames relative to the feature's (median over features: what a
linear probe on standardised features sees), CLS and patch tokens, for ViT-B/16 and the quickstart's small
MAE (random weights; ``bench_precision_probe.py`` measures what it costs a probe).

``compile`` (not run by default: minutes of compiling on 2 cores): ``torch.compile`` (inductor) of the
stock forward against timm and the fused forward, with its compile time.

Readers (section ``readers``): frames/s on one core of ``load_frames`` for PNG and for DICOM
(uncompressed, JPEG 2000, RLE, JPEG baseline cine).

Run: ``python benchmarks/bench_inference.py`` (several minutes on 2 cores; ``--iterations`` trades time for
steadier numbers, ``--sections`` picks parts; ``--device cuda --peak-tflops 989`` on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from usfmae_hf.launch import library_progress_bars, verbose_requested
from usfmae_hf.precision import bf16_support, cpu_features, cpu_name, describe_precision

BATCH_IMAGE_SIZE = 224


def interleaved_seconds(
    functions: dict[str, Callable[[], object]], rounds: int, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Seconds of each call of each function over ``rounds`` round-robin rounds (after a warm-up round).

    Taking turns spreads the load of other processes on a shared machine evenly over the contenders. On a
    GPU every call is followed by a synchronisation, so it is timed to its end.
    """
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(rounds + 1):
        for name, function in functions.items():
            sync()
            start = time.perf_counter()
            function()
            sync()
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def best_seconds(function: Callable[[], object], iterations: int, device: torch.device | None = None) -> float:
    """Fastest of ``iterations`` timed calls after one warm-up call (for peaks and readers)."""
    return min(interleaved_seconds({"f": function}, iterations, device)["f"])


def vit_forward_flops(
    image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, mlp: int = 3072, cls_only: bool = False
) -> float:
    """Multiply-add FLOPs (2 per MAC) of one ViT encoder forward pass (patch embedding + blocks).

    ``cls_only``: the last block computes keys and values of all tokens but everything else for the CLS token
    only, as ``extract_features(pooling="cls")`` does.
    """
    tokens = (image_size // patch) ** 2 + 1
    patch_embed = (tokens - 1) * (3 * patch * patch) * dim
    per_block = tokens * (4 * dim * dim + 2 * dim * mlp) + 2 * tokens * tokens * dim
    last_block = tokens * 2 * dim * dim + (2 * dim * dim + 2 * dim * mlp) + 2 * tokens * dim if cls_only else per_block
    return 2.0 * (patch_embed + (depth - 1) * per_block + last_block)


# Square GEMMs and ViT-B's own MLP GEMMs at batch 16 (16 x 197 tokens): the best of them is the peak.
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (16 * 197, 768, 3072), (16 * 197, 3072, 768))


def matmul_peak(iterations: int, device: torch.device) -> float:
    """The best fp32 matrix-product FLOP/s over :data:`PEAK_SHAPES` on ``device``: ``torch.mm`` and, on a CPU
    with oneDNN, oneDNN's linear on pre-packed weights (the fused forward's fp32 path on some CPUs)."""
    rates = []
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        products = [lambda a=a, b=b: torch.mm(a, b)]
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
            products.append(lambda a=a, w=packed: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "none"))
        rates += [2.0 * m * k * n / best_seconds(product, iterations, device) for product in products]
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


def timm_vit_b(device: torch.device) -> torch.nn.Module:
    """timm's ViT-B/16 (``vit_base_patch16_224`` without its head), random weights, eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=0,
    )
    return model.eval().to(device)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """Of two ``(N, ...)`` feature tensors: the min cosine similarity over images, the max abs difference and
    the median over features of the difference's spread over images relative to the reference feature's
    (what a linear probe on standardised features sees; near-constant features make it large)."""
    a, b = reference.flatten(1).double(), other.flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
    relative = ((a - b).std(0) / a.std(0).clamp_min(1e-12)).median().item()
    return cosine, (a - b).abs().max().item(), relative


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


class Report:
    """Prints img/s, the ratio to a reference and the share of each peak for each contender of one run.

    A contender whose name says ``CLS`` is credited with the FLOPs of the CLS-only last block.
    """

    def __init__(self, batch: int, peaks: dict[str, float]):
        self.batch, self.peaks = batch, peaks

    def rows(self, seconds: dict[str, list[float]], reference: str, reference_label: str) -> dict[str, float]:
        rates = {name: self.batch / value for name, value in medians(seconds).items()}
        for name, rate in rates.items():
            flops = vit_forward_flops(cls_only="CLS" in name)
            shares = "  ".join(f"{rate * flops / peak:6.1%} of {label}" for label, peak in self.peaks.items())
            ratios = [ref / own for ref, own in zip(seconds[reference], seconds[name], strict=True)]
            low, middle, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"  {name:58s} {rate:7.2f} img/s  {middle:5.2f}x {reference_label} [{low:.2f}-{high:.2f}]  {shares}")
        return rates


def race_timm(
    contenders: dict[str, Callable[[], object]], pixel_values: torch.Tensor, iterations: int, report: Report
) -> None:
    """Time ``contenders`` in the same rounds as timm's fp32 ViT-B/16 ``forward_features`` and report ratios."""
    timm_model = timm_vit_b(pixel_values.device)

    @torch.inference_mode()
    def run_timm():
        return timm_model.forward_features(pixel_values)

    reference = "timm forward_features fp32 (reference)"
    seconds = interleaved_seconds({reference: run_timm, **contenders}, iterations, pixel_values.device)
    report.rows(seconds, reference, "timm fp32")


def other_linear_backend(encoder: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[str, Any] | None:
    """The name of the fp32 linear backend this CPU does not choose (oneDNN or ``torch.mm``), and ``encoder``
    with its fused forward built on it; ``None`` off the CPU or without oneDNN."""
    from usfmae_hf.inference import features

    if pixel_values.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    chosen = features._onednn_linear
    features._onednn_linear = lambda device, dtype: not chosen(device, dtype)
    try:  # the first call builds and caches the encoder's fused forward; later calls reuse it as it was built
        features.extract_features(encoder, pixel_values)
    finally:
        features._onednn_linear = chosen
    return ("torch.mm" if chosen(pixel_values.device, torch.float32) else "oneDNN"), encoder


def bench_fp32(batch: int, iterations: int, device: torch.device, report: Report) -> None:
    from transformers import ViTMAEForPreTraining

    from usfmae_hf.inference.features import extract_features, fast_path_blocker, linear_backend, load_encoder

    torch.manual_seed(0)
    pixel_values = torch.randn(batch, 3, BATCH_IMAGE_SIZE, BATCH_IMAGE_SIZE, device=device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(batch)]
    with tempfile.TemporaryDirectory() as directory:
        random_model_directory(directory)
        encoder = load_encoder(directory, device=device)
        stock = ViTMAEForPreTraining.from_pretrained(directory).vit.eval().to(device)  # stock ViTMAEModel
        other = other_linear_backend(load_encoder(directory, device=device), pixel_values[:1])
    noise = torch.arange(196, dtype=torch.float32, device=device).expand(batch, -1)
    print(f"  fused forward: {fast_path_blocker(encoder) or 'used'}; linear layers: {linear_backend(encoder)}")

    def features(source, pooling="cls", fast=True, model=encoder):
        return lambda: extract_features(model, source, pooling, batch_size=batch, fast=fast)

    @torch.inference_mode()
    def run_stock():
        return stock(pixel_values, noise=noise)

    contenders = {
        "extract_features, CLS (pixel_values)": features(pixel_values),
        "extract_features, patch tokens (pixel_values)": features(pixel_values, "patches"),
        "extract_features, CLS, PIL 640x480 incl. preprocessing": features(images),
        "extract_features, patch tokens, fast=False (stock forward)": features(pixel_values, "patches", False),
        "stock ViTMAEModel (mask_ratio 0)": run_stock,
    }
    if other is not None:  # the fp32 linear backend not chosen here, so that the choice is measured on this CPU
        contenders[f"extract_features, patch tokens, linear layers on {other[0]} (not chosen here)"] = features(
            pixel_values, "patches", model=other[1]
        )
    race_timm(contenders, pixel_values, iterations, report)
    frames = ultrasound_frames(batch)
    for label, source in (("random pixel_values", pixel_values), (f"{batch} ultrasound frames", frames)):
        for pooling in ("cls", "patches"):
            cosine, difference = agreement(
                extract_features(encoder, source, pooling, batch_size=batch, fast=False),
                extract_features(encoder, source, pooling, batch_size=batch),
            )
            print(
                f"  fused vs stock forward, {pooling:7s} on {label:22s}: max abs diff {difference:.2e}, "
                f"min cosine {cosine:.8f} (tolerance 1e-4, 0.99999)"
            )


def bench_precision(batch: int, iterations: int, device: torch.device, report: Report) -> None:
    """bf16 vs fp32 features on real ultrasound frames, then the bf16 paths of ViT-B/16 against timm fp32."""
    from usfmae_hf.inference.features import extract_features, load_encoder, processor_for
    from usfmae_hf.quickstart.runner import SMALL_MAE

    frames = ultrasound_frames(batch)
    for label, config in (("small MAE (quickstart, 64 px)", SMALL_MAE), ("ViT-B/16 (224 px)", {})):
        with tempfile.TemporaryDirectory() as directory:
            random_model_directory(directory, **config)
            fp32 = load_encoder(directory, device=device)
            bf16 = load_encoder(directory, device=device, dtype=torch.bfloat16)
            pixel_values = processor_for(fp32)(frames, return_tensors="pt")["pixel_values"].to(device)
        print(f"  {label}:")
        for pooling in ("cls", "patches"):
            reference = extract_features(fp32, pixel_values, pooling, batch_size=batch)
            for name, fast in (("fused", True), ("stock", False)):
                cosine, difference, relative = agreement(
                    reference, extract_features(bf16, pixel_values, pooling, batch_size=batch, fast=fast)
                )
                print(
                    f"    bf16 weights ({name} forward) vs fp32, {pooling:7s}: min cosine {cosine:.6f}, "
                    f"max abs diff {difference:.4f}, error / spread over frames {relative:.3f}"
                )
    time_bf16_paths(fp32, bf16, pixel_values, iterations, report)  # ViT-B, the last model above


def time_bf16_paths(
    fp32: torch.nn.Module, bf16: torch.nn.Module, pixel_values: torch.Tensor, iterations: int, report: Report
) -> None:
    from usfmae_hf.inference.features import extract_features

    batch, device = len(pixel_values), pixel_values.device

    def features(encoder, pooling="cls", fast=True, autocast=False):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return extract_features(encoder, pixel_values, pooling, batch_size=batch, fast=fast)

        return run

    contenders = {
        "extract_features fp32, CLS": features(fp32),
        "extract_features bf16 weights, CLS": features(bf16),
        "extract_features bf16 weights, patch tokens": features(bf16, "patches"),
        "extract_features bf16 weights, patch tokens, fast=False": features(bf16, "patches", False),
        "extract_features fp32 weights, bf16 autocast, patch tokens, fast=False": features(
            fp32, "patches", False, True
        ),
    }
    race_timm(contenders, pixel_values, iterations, report)


def bench_compile(batch: int, iterations: int, device: torch.device, report: Report) -> None:
    """``torch.compile`` (inductor, default mode) of the stock forward against timm and the fused forward."""
    from usfmae_hf.inference.features import extract_features, load_encoder

    pixel_values = torch.randn(batch, 3, BATCH_IMAGE_SIZE, BATCH_IMAGE_SIZE, device=device)
    with tempfile.TemporaryDirectory() as directory:
        random_model_directory(directory)
        encoder = load_encoder(directory, device=device)
    compiled = torch.compile(encoder)
    start = time.perf_counter()
    with torch.inference_mode():
        output = compiled(pixel_values=pixel_values).last_hidden_state
    print(f"  torch.compile (inductor): first call (compiling) {time.perf_counter() - start:.0f} s")
    cosine, difference = agreement(extract_features(encoder, pixel_values, "patches", fast=False), output[:, 1:])
    print(f"  compiled vs stock forward: max abs diff {difference:.2e}, min cosine {cosine:.8f}")

    contenders = {
        "torch.compile(stock ViTModel)": torch.inference_mode()(lambda: compiled(pixel_values=pixel_values)),
        "extract_features, patch tokens": lambda: extract_features(encoder, pixel_values, "patches"),
    }
    race_timm(contenders, pixel_values, iterations, report)


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


def describe_device(device: torch.device) -> str:
    """The machine in one line: CPU model, its vector/matrix features, torch's kernels, the ``auto`` precision."""
    line = (
        f"CPU {cpu_name()} ({', '.join(cpu_features()) or 'features unknown'}; torch kernels "
        f"{torch.backends.cpu.get_cpu_capability()}; fast bf16: {bf16_support('cpu') or 'no'})"
    )
    if device.type == "cuda":
        line += f"; GPU {torch.cuda.get_device_name(device)}"
    return f"{line}; --dtype auto on {device}: {describe_precision('auto', device)}"


SECTIONS = ("fp32", "precision", "compile", "readers")
DEFAULT_SECTIONS = ("fp32", "precision", "readers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument(
        "--iterations", type=int, default=5, help="timed rounds after a warm-up; medians are kept (default: 5)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help=f"what to measure (default: {' '.join(DEFAULT_SECTIONS)}; compile takes minutes on 2 cores)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for the dtype measured (e.g. a datasheet's dense bf16 figure): adds MFU",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, device {device}")
    print(describe_device(device))
    flops = vit_forward_flops()
    peaks: dict[str, float] = {}
    if {"fp32", "precision", "compile"} & set(args.sections):
        peaks["fp32 matmul peak"] = matmul_peak(max(args.iterations, 10), device)
        print(
            f"fp32 matmul peak (best of torch.mm and oneDNN, square and ViT-B MLP GEMMs) on {device}: "
            f"{peaks['fp32 matmul peak'] / 1e9:.1f} GFLOP/s; ViT-B/16 forward: {flops / 1e9:.1f} GFLOP/image"
        )
    if args.peak_tflops:
        peaks[f"{args.peak_tflops:g} TFLOP/s (MFU)"] = args.peak_tflops * 1e12
    report = Report(args.batch_size, peaks)
    if "fp32" in args.sections:
        print("fp32, ViT-B/16 (target: extract_features >= 1.15x timm):")
        bench_fp32(args.batch_size, args.iterations, device, report)
    if "precision" in args.sections:
        print(f"bf16 (target where AMX exists: >= 3x timm fp32), {args.batch_size} pydicom-data ultrasound frames:")
        bench_precision(args.batch_size, args.iterations, device, report)
    if "compile" in args.sections:
        print("torch.compile, fp32, ViT-B/16:")
        bench_compile(args.batch_size, args.iterations, device, report)
    if "readers" in args.sections:
        # The readers are single-threaded Python: frames/s in this process is frames/s per core.
        torch.set_num_threads(1)
        for name, rate in bench_readers(args.iterations).items():
            print(f"  reader {name:48s} {rate:7.1f} frames/s per core")


if __name__ == "__main__":
    with library_progress_bars(verbose_requested()):  # no "Loading weights" bars between the rows
        main()
