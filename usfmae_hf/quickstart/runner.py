"""``usfmae quickstart``: the whole USF-MAE lifecycle on real ultrasound scans, in minutes on a CPU.

The real ultrasound DICOMs that ``pydicom-data`` ships (GE, Philips, ALOKA, SonoSite; stills and
a 120-frame cine) go through every stage the package offers, each run exactly as the command that
the report prints:

1. ingest them into a Parquet Hugging Face dataset (``usfmae ingest``);
2. write a small MAE in USF-MAE's original checkpoint layout and convert it, verified
   (``usfmae convert``) - the released USF-MAE weights cannot be downloaded here, so a small
   randomly initialised model of the same structure stands in for them;
3. continue pretraining it with the Accelerate loop (``usfmae pretrain``);
4. load the result with ``AutoModel`` and the exact (PIL-backend) image processor
   (:func:`usfmae_hf.image.processor.load_image_processor`), measuring how far the default
   ``AutoImageProcessor`` backend is from it on these frames;
5. extract features (``usfmae features``) and draw a reconstruction (``usfmae reconstruct``);
6. build a small labelled task from the ingested frames (probe orientation: upright vs flipped fan),
   split by scan so that no scan content is in both splits, and prove it with ``check_leakage``
   (:mod:`usfmae_hf.quickstart.task`);
7. fine-tune a classifier on it with the Trainer (``usfmae finetune``);
8. write ``REPORT.md`` with the figures, metrics and the commands for the real checkpoints/datasets.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.quickstart.report import Step, write_report
from usfmae_hf.quickstart.task import build_orientation_task, check_task_leakage

ULTRASOUND_DICOMS = (
    "US1_UNCR.dcm",
    "US1_J2KR.dcm",
    "OBXXXX1A.dcm",
    "OBXXXX1A_2frame.dcm",
    "OBXXXX1A_rle.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "color3d_jpeg_baseline.dcm",
)
RAW_FOLDER = "pydicom-data-ultrasound"
NUM_STEPS = 8  # ingest, convert, pretrain, load back, features, reconstruction, task + leakage check, fine-tune
# A small MAE with USF-MAE's structure (sin-cos positions, 8x8 patches, light decoder), sized for a laptop CPU.
SMALL_MAE = dict(
    image_size=64,
    patch_size=8,
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=3,
    intermediate_size=384,
    decoder_hidden_size=64,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=256,
)


@dataclass
class QuickstartSettings:
    pretrain_steps: int = 200
    finetune_steps: int = 150
    frame_stride: int = 4
    batch_size: int = 8


def collect_ultrasound_dicoms(destination: Path) -> list[Path]:
    """Copy the real ultrasound DICOMs shipped by ``pydicom-data`` into ``destination``."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError as error:  # pragma: no cover - pydicom is a core dependency
        raise UsfmaeError("pydicom is required for the quickstart") from error
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ULTRASOUND_DICOMS:
        source = get_testdata_file(name)
        if source is None:
            continue
        target = destination / name
        shutil.copyfile(source, target)
        copied.append(target)
    if not copied:
        raise UsfmaeError("no ultrasound DICOMs found: install the 'pydicom-data' package (pip install pydicom-data)")
    return copied


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


class Quickstart:
    """Runs the stages in order, timing each and recording the equivalent shell command."""

    def __init__(self, output: Path, settings: QuickstartSettings, log: Callable[[str], None] = print):
        self.output = output
        self.settings = settings
        self.log = log
        self.steps: list[Step] = []
        self.results: dict = {}

    def _run(self, title: str, argv: Sequence[str], action: Callable[[], object]) -> object:
        number = len(self.steps) + 1
        command = shlex.join(argv)
        self.log(f"\n[{number}/{NUM_STEPS}] {title}\n$ {command}")
        start = time.perf_counter()
        value = action()
        step = Step(title, command, time.perf_counter() - start)
        self.steps.append(step)
        self.log(f"[{number}/{NUM_STEPS}] done in {step.seconds:.1f} s")
        return value

    def run(self) -> Path:
        out = self.output
        raw_root = out / "raw"
        dicoms = collect_ultrasound_dicoms(raw_root / RAW_FOLDER)
        self.results["dicoms"] = [p.name for p in dicoms]

        dataset_dir = out / "dataset"
        self._cli(
            "Ingest the real ultrasound DICOMs into a Hugging Face dataset",
            [
                "usfmae",
                "ingest",
                str(raw_root),
                "--output",
                str(dataset_dir),
                "--frame-stride",
                str(self.settings.frame_stride),
            ],
        )

        checkpoint = out / "start" / "small_mae_original_layout.pth"
        self._write_start_checkpoint(checkpoint)
        start_model = out / "start" / "hf"
        self._cli(
            "Convert the original-layout checkpoint to a Hugging Face directory (verified)",
            [
                "usfmae",
                "convert",
                str(checkpoint),
                "--output",
                str(start_model),
                "--num-attention-heads",
                str(SMALL_MAE["num_attention_heads"]),
                "--decoder-num-attention-heads",
                str(SMALL_MAE["decoder_num_attention_heads"]),
            ],
        )

        pretrain_dir = out / "pretrain"
        self._pretrain(start_model, dataset_dir, pretrain_dir)
        final = pretrain_dir / "final"

        self._features_and_reconstruction(final, dicoms, out)
        task_dir = out / "orientation-task"
        self._build_task(dataset_dir, task_dir)
        self._finetune(final, task_dir, out)
        report = out / "REPORT.md"
        write_report(report, self.steps, self.results)
        self.log(f"\nreport: {report}")
        return report

    # -- stages ------------------------------------------------------------------------------------

    def _cli(self, title: str, argv: list[str]) -> None:
        """Run a ``usfmae`` sub-command in-process, keeping what it prints for the report."""
        from usfmae_hf.cli import main as cli_main

        printed = io.StringIO()

        def action():
            with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
                status = cli_main(argv[1:])
            if status:
                raise UsfmaeError(f"step failed ({shlex.join(argv)}): exit status {status}")

        self._run(title, argv, action)
        self.steps[-1].notes = printed.getvalue().strip().splitlines()

    def _write_start_checkpoint(self, path: Path) -> None:
        import torch

        from usfmae_hf.model.reference_mae import ReferenceMAE

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        kwargs = {**SMALL_MAE, "num_channels": 3, "layer_norm_eps": 1e-6}
        torch.save(ReferenceMAE.from_hf_config_kwargs(kwargs).state_dict(), path)

    def _pretrain(self, start_model: Path, dataset_dir: Path, pretrain_dir: Path) -> None:
        from usfmae_hf.pretraining import main as pretrain_main

        s = self.settings
        flags = [
            "--model_name_or_path",
            str(start_model),
            "--dataset_dir",
            str(dataset_dir),
            "--output_dir",
            str(pretrain_dir),
            "--max_steps",
            str(s.pretrain_steps),
            "--per_device_train_batch_size",
            str(s.batch_size),
            "--learning_rate",
            "1e-3",
            "--warmup_steps",
            "5",
            "--logging_steps",
            "10",
            "--dataloader_num_workers",
            "0",
            "--num_reconstruction_images",
            "4",
            "--seed",
            "0",
        ]

        def action():
            if pretrain_main(flags):
                raise UsfmaeError("pretraining failed")

        self._run("Continue pretraining with the Accelerate MAE loop", ["usfmae", "pretrain", *flags], action)
        records = [json.loads(line) for line in (pretrain_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        self.results["pretrain_log"] = records

    def _features_and_reconstruction(self, model_dir: Path, dicoms: list[Path], out: Path) -> None:
        def load_back():
            from transformers import AutoModel

            from usfmae_hf.image.processor import build_image_processor, load_image_processor
            from usfmae_hf.inference.pipelines import default_backend_difference
            from usfmae_hf.io import load_frames

            model = AutoModel.from_pretrained(model_dir)
            processor = load_image_processor(model_dir)
            self.results["loaded"] = f"{type(model).__name__} + {type(processor).__name__} (PIL backend, exact)"
            frames = [next(load_frames(path)).image for path in dicoms]
            self.results["processor_difference"] = {
                size: default_backend_difference(exact, frames)
                for size, exact in ((processor.size["height"], processor), (224, build_image_processor(224)))
            }

        self._run(
            "Load the pretrained model back with AutoModel and the exact image processor",
            [
                "python",
                "-c",
                "from transformers import AutoModel; from usfmae_hf.image.processor import load_image_processor; "
                f"AutoModel.from_pretrained({str(model_dir)!r}); load_image_processor({str(model_dir)!r})",
            ],
            load_back,
        )
        self.steps[-1].notes = [
            f"default AutoImageProcessor backend vs exact at {size} px on the first frame of each file: max "
            f"{d['max']:.3f}, mean {d['mean']:.5f} (normalised units), {d['images_differing']}/{len(dicoms)} differ"
            for size, d in self.results["processor_difference"].items()
        ]
        features = out / "features.parquet"
        self._cli(
            "Extract CLS features of every frame",
            ["usfmae", "features", str(dicoms[0].parent), "--model", str(model_dir), "--output", str(features)],
        )
        self.results["features"] = features
        still = next((p for p in dicoms if p.name.startswith("US1")), dicoms[0])
        self._cli(
            "Draw a masked reconstruction",
            [
                "usfmae",
                "reconstruct",
                str(still),
                "--model",
                str(model_dir),
                "--output",
                str(out / "reconstruction.png"),
            ],
        )

    def _build_task(self, dataset_dir: Path, task_dir: Path) -> None:
        def action():
            task = build_orientation_task(dataset_dir, task_dir)
            return task, check_task_leakage(task_dir)

        task, leakage = self._run(
            "Build the labelled task from the ingested frames, split by scan, and check it for leakage",
            [
                "python",
                "-c",
                "from usfmae_hf.quickstart.task import build_orientation_task, check_task_leakage; "
                f"build_orientation_task({str(dataset_dir)!r}, {str(task_dir)!r}); "
                f"print(check_task_leakage({str(task_dir)!r}))",
            ],
            action,
        )
        self.results["task"] = task
        self.results["leakage"] = str(leakage)
        self.log(f"leakage check: {leakage}")
        self.steps[-1].notes = [
            *(
                f"scan {scan} ({', '.join(entry['files'])}): {entry['frames']} frames -> {entry['split']}"
                for scan, entry in task.scans.items()
            ),
            f"check_leakage: {leakage}",
        ]

    def _finetune(self, model_dir: Path, task_dir: Path, out: Path) -> None:
        finetune_dir = out / "finetune"
        s = self.settings
        flags = [
            "--model_name_or_path",
            str(model_dir),
            "--train_dir",
            str(task_dir / "train"),
            "--validation_dir",
            str(task_dir / "validation"),
            "--output_dir",
            str(finetune_dir),
            "--max_steps",
            str(s.finetune_steps),
            "--per_device_train_batch_size",
            str(s.batch_size),
            "--head",
            "mean",
            "--learning_rate",
            "3e-4",
            "--warmup_steps",
            "10",
            "--augment",
            "none",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--logging_steps",
            "10",
            "--seed",
            "0",
            "--dataloader_num_workers",
            "0",
            "--disable_tqdm",
            "false",
        ]

        def action():
            from usfmae_hf.finetuning.run import main as finetune_main

            if finetune_main(flags):
                raise UsfmaeError("fine-tuning failed")

        self._run(
            "Fine-tune a classifier with the Trainer (upright vs flipped scans)",
            ["usfmae", "finetune", *flags],
            action,
        )
        self.results["finetune"] = json.loads((finetune_dir / "all_results.json").read_text())
        state = json.loads((finetune_dir / "trainer_state.json").read_text())
        self.results["finetune_log"] = [entry for entry in state["log_history"] if "loss" in entry]
        self.results["finetune_dir"] = finetune_dir


def run_quickstart(
    output: str | os.PathLike, *, settings: QuickstartSettings | None = None, overwrite: bool = False
) -> Path:
    """Run every stage into ``output`` and return the path of ``REPORT.md``."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise UsfmaeError(f"{output} is not empty (pass --overwrite to start again)")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the quickstart downloads
    start = time.perf_counter()
    report = Quickstart(output, settings or QuickstartSettings()).run()
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return report
