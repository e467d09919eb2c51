"""``usfmae cv``: run fine-tuning or a probe on every fold of a task and report fold statistics and bounded 95% CIs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usfmae_hf.commands import positive_int
from usfmae_hf.commands.probe import TASKS, add_output_arguments, add_probe_arguments, probe_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cv",
        help="k-fold evaluation (fine-tuning or probe) with mean, std and bounded 95%% confidence intervals",
        description=(
            "Run fine-tuning or a probe (--cv-method; the probe's kind is --method) on each of --folds of --task, "
            "each fold into OUTPUT_DIR/fold_<k>, then summarise the --split metrics: mean and sample std over "
            "folds; the metric on the pooled out-of-fold predictions with a 95% percentile-bootstrap interval "
            "(resampling patients where the task knows them, images otherwise); and, with 3 or more folds, a "
            "Student-t interval of the fold mean on the logit scale. Both intervals stay inside the metric's "
            "range. Undefined fold metrics (e.g. AUROC with a class absent from a fold) are excluded and "
            "counted, never averaged; a split lacking a class is flagged with a warning. Writes "
            "OUTPUT_DIR/cv_results.json. With --cv-method finetune, arguments after `--` go to the fine-tuning "
            "script (any TrainingArguments or recipe flag, e.g. -- --recipe mae --num_train_epochs 50)."
        ),
    )
    parser.add_argument(
        "--cv-method",
        "--cv_method",
        dest="cv_method",
        choices=("finetune", "probe"),
        default="probe",
        help="finetune: `usfmae finetune` per fold; probe: `usfmae probe` per fold (default: probe)",
    )
    add_probe_arguments(parser)
    parser.add_argument("--task", choices=TASKS, required=True, help="evaluation set with official folds")
    parser.add_argument(
        "--data-root",
        "--data_root",
        dest="data_root",
        required=True,
        help="folder where the --task dataset was unpacked",
    )
    parser.add_argument(
        "--folds", type=int, nargs="+", required=True, help="folds to run (BUS-BRA: 1 2 3 4 5; GIST514-DB: 0 1 2 3 4)"
    )
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="split whose metrics are summarised (default: test)",
    )
    parser.add_argument(
        "--bootstrap-resamples",
        "--bootstrap_resamples",
        dest="bootstrap_resamples",
        type=positive_int,
        default=2000,
        help="bootstrap resamples of the pooled predictions (default: 2000; seed 0)",
    )
    parser.add_argument(
        "--skip-unreadable",
        "--skip_unreadable",
        dest="skip_unreadable",
        action="store_true",
        help="drop undecodable images with a warning (default: stop with an error)",
    )
    add_output_arguments(parser, "folder for the folds and cv_results.json")
    parser.add_argument(
        "finetune_args", nargs=argparse.REMAINDER, help="after `--`: fine-tuning flags (--cv-method finetune)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.atomic import atomic_write_text
    from usfmae_hf.errors import UsfmaeError
    from usfmae_hf.evaluation.crossval import format_summary, pool_predictions, summarize_folds
    from usfmae_hf.evaluation.metrics import json_ready

    extra = args.finetune_args[1:] if args.finetune_args[:1] == ["--"] else args.finetune_args
    if extra and args.cv_method != "finetune":
        raise UsfmaeError(f"extra arguments {extra} are only accepted with --cv-method finetune")
    fold_results, patients = {}, {}
    for fold in args.folds:
        output = args.output_dir / f"fold_{fold}"
        print(f"== fold {fold} -> {output}")
        fold_results[str(fold)] = _run_fold(args, fold, output, extra)
        fold_patients = _patients(args, fold)
        patients = None if fold_patients is None or patients is None else patients | fold_patients
    pooled = pool_predictions(
        [args.output_dir / f"fold_{fold}" / f"{args.split}_predictions.csv" for fold in args.folds], patients
    )
    summary = summarize_folds(fold_results, pooled, split=args.split, n_resamples=args.bootstrap_resamples)
    atomic_write_text(
        args.output_dir / "cv_results.json",
        json.dumps(json_ready({"folds": fold_results, "summary": summary}), indent=2, allow_nan=False),
    )
    print(format_summary(summary))
    return 0


def _patients(args: argparse.Namespace, fold: int) -> dict[str, str] | None:
    """Image id -> patient id of the fold's --split, or ``None`` when the task records no patients."""
    from usfmae_hf.evaluation.crossval import PATIENT_COLUMNS
    from usfmae_hf.evaluation.labelled import load_labelled_images

    split = load_labelled_images(task=args.task, data_root=args.data_root, fold=fold)[args.split]
    column = next((name for name in PATIENT_COLUMNS if name in split.column_names), None)
    return None if column is None else dict(zip(split["id"], split[column], strict=True))


def _run_fold(args: argparse.Namespace, fold: int, output: Path, extra: list[str]) -> dict:
    data = {"task": args.task, "data_root": args.data_root, "fold": fold}
    if args.cv_method == "probe":
        from usfmae_hf.evaluation.probe import run_probe

        return run_probe(args.model, output, data=data, overwrite=args.overwrite, **probe_kwargs(args))

    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.atomic import ensure_writable_output
    from usfmae_hf.finetuning.run import DataArguments, ModelArguments, run_finetuning

    ensure_writable_output(output, args.overwrite)
    argv = [
        "--model_name_or_path",
        str(args.model),
        "--task",
        args.task,
        "--data_root",
        args.data_root,
        "--fold",
        str(fold),
        "--output_dir",
        str(output),
        "--skip_unreadable",
        str(args.skip_unreadable),
        *(["--overwrite_output_dir"] if args.overwrite else []),
        *extra,
    ]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return run_finetuning(*parser.parse_args_into_dataclasses(argv))
