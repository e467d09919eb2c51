"""``usfmae convert`` (original MAE checkpoint -> HF directory) and ``usfmae export-original`` (back)."""

from __future__ import annotations

import argparse
from pathlib import Path

from usfmae_hf.commands import open_unit_fraction
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.publishing.cards import (
    LICENSE_EXAMPLES,
    OFFICIAL_LICENSE,
    OFFICIAL_RELEASES,
    UNKNOWN_LICENSE,
    check_license_id,
)

# usfmae_hf.model.conversion.STORAGE_DTYPES, spelled out: importing that module (torch, transformers)
# would slow every command's start.
STORAGE_DTYPES = ("keep", "fp32", "fp16", "bf16")


def license_id(value: str) -> str:
    """``--license``: a Hub license id (see :func:`~usfmae_hf.publishing.cards.check_license_id`)."""
    try:
        return check_license_id(value)
    except UsfmaeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of the conversion, shared by ``usfmae convert`` and ``conversion/convert_usfmae_to_hf.py``."""
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="original checkpoint: .pt/.pth (bare state dict, {'model': ...} or encoder-only) or .safetensors",
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="model directory to create (written atomically)"
    )
    parser.add_argument(
        "--format",
        dest="output_format",
        choices=("vitmae", "vit"),
        default="vitmae",
        help="vitmae: ViTMAEForPreTraining with decoder (AutoModel gives ViTMAEModel); "
        "vit: encoder-only ViTModel (identity pooler: pooler_output is the normed CLS token), for features "
        "and ViTForImageClassification "
        "(default: vitmae)",
    )
    parser.add_argument(
        "--norm-pix-loss",
        action="store_true",
        help="the checkpoint was trained on per-patch normalised pixels (Meta's MAE releases; USF-MAE was not)",
    )
    parser.add_argument(
        "--mask-ratio",
        type=open_unit_fraction,
        default=0.75,
        help="masking ratio recorded in the config for pretraining (default: 0.75)",
    )
    parser.add_argument(
        "--num-attention-heads",
        type=int,
        default=None,
        help="encoder heads (default: ViT preset for the width, e.g. 12 for 768)",
    )
    parser.add_argument(
        "--decoder-num-attention-heads",
        type=int,
        default=None,
        help="decoder heads (default: 16, as every released MAE)",
    )
    parser.add_argument(
        "--source",
        dest="declared_source",
        choices=tuple(OFFICIAL_RELEASES),
        default=None,
        help="declare the checkpoint to be this official USF-MAE release (recorded in the provenance; only then "
        "does the model card state what the paper says about the official checkpoints: pretraining corpus, F1 scores)",
    )
    parser.add_argument(
        "--license",
        type=license_id,
        default=None,
        help=f"Hub license id of the weights, e.g. {LICENSE_EXAMPLES} (default: {OFFICIAL_LICENSE} with "
        f"--source, else '{UNKNOWN_LICENSE}')",
    )
    parser.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default="fp32",
        help="precision of the written weights: keep (the checkpoint's own, e.g. an fp16 release bit for bit), "
        "fp32, fp16 or bf16; verification runs in fp32 whatever this is (default: fp32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the number-for-number check against the reference implementation",
    )
    return parser


def run_convert(args: argparse.Namespace) -> int:
    from usfmae_hf.model.conversion import convert_checkpoint

    result = convert_checkpoint(
        args.checkpoint,
        args.output,
        output_format=args.output_format,
        norm_pix_loss=args.norm_pix_loss,
        mask_ratio=args.mask_ratio,
        num_attention_heads=args.num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        overwrite=args.overwrite,
        verify=args.verify,
        declared_source=args.declared_source,
        license=args.license,
        dtype=args.dtype,
    )
    print(f"detected layout: {result.layout}")
    if result.max_abs_diff:
        print(
            "verified against the reference MAE (max abs diff): "
            + ", ".join(f"{k} {v:.2e}" for k, v in result.max_abs_diff.items())
        )
    else:
        print("verification skipped (--no-verify)")
    if result.layout == "encoder_only" or args.output_format == "vit":
        print(
            "encoder-only directory: AutoModel gives the encoder; there is no decoder for reconstruction or pretraining"
        )
    if args.declared_source is None:
        print(
            "model card: not declared an official USF-MAE release (--source), so it states nothing about how the "
            "weights were trained"
        )
    if args.license is None and args.declared_source is None:
        print(f"model card: license '{UNKNOWN_LICENSE}' (set it with --license)")
    print(f"wrote {result.output_dir}")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``usfmae export-original`` and ``conversion/convert_hf_to_original.py``."""
    parser.add_argument(
        "model_dir", type=Path, help="a directory written by 'usfmae convert' (or any ViTMAE/ViT directory)"
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="original-layout state dict file to write (.pth)"
    )
    parser.add_argument(
        "--encoder-only",
        action="store_true",
        help="leave out the decoder and mask token: a file that timm's VisionTransformer loads strictly, e.g. "
        "timm.create_model('vit_base_patch16_224', num_classes=0).load_state_dict(torch.load(file)) for ViT-B",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def run_export(args: argparse.Namespace) -> int:
    from usfmae_hf.model.conversion import export_original

    written = export_original(args.model_dir, args.output, overwrite=args.overwrite, encoder_only=args.encoder_only)
    print(f"wrote {written}")
    return 0


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert an original MAE/USF-MAE checkpoint to a Hugging Face model directory",
        description="Convert an original MAE/USF-MAE checkpoint into config.json + model.safetensors + "
        "preprocessor_config.json + model card, verified against an independent implementation.",
    )
    add_convert_arguments(convert).set_defaults(func=run_convert)
    export = subparsers.add_parser(
        "export-original",
        help="write a converted directory back in the original MAE key layout",
        description="Write the original MAE state dict (qkv merged) from a converted directory.",
    )
    add_export_arguments(export).set_defaults(func=run_export)
