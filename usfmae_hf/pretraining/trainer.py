"""The MAE pretraining loop on ``accelerate``: one CPU process to multi-node GPUs, resumable mid-epoch."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.augment import build_eval_transform, build_split_train_transform, build_train_transform
from usfmae_hf.image.processor import build_image_processor
from usfmae_hf.pretraining.arguments import (
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    apply_recipe,
    validate_arguments,
)
from usfmae_hf.pretraining.checkpointing import TrainState, publish, remove_stale_staging, resolve_resume, staging_dir
from usfmae_hf.pretraining.data import MapStyleImages, SampleMaker, StreamingImages, collate, first_images, load_source
from usfmae_hf.pretraining.modeling import build_lr_scheduler, build_model, parameter_groups, scaled_learning_rate
from usfmae_hf.pretraining.reporting import StepLog, plot_curves

# Fewer samples than this say little about the bad-image rate; the check waits (except at the end).
MIN_SAMPLES_FOR_BAD_CHECK = 1000


@dataclasses.dataclass
class _Plan:
    """Numbers fixed for the whole run."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    effective_batch_size: int


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> Path:
    """Pretrain (or continue pretraining) an MAE; return the ``final/`` model directory."""
    validate_arguments(model_args, data_args, args)
    return Pretrainer(model_args, data_args, args).train()


class Pretrainer:
    """One pretraining run: set up by the constructor (resuming if asked), run by :meth:`train`."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> None:
        from accelerate.utils import set_seed

        notes = apply_recipe(model_args, args, cuda_available=torch.cuda.is_available())
        self.data_args, self.args = data_args, args
        self.output_dir = Path(args.output_dir)
        self.accelerator = _build_accelerator(args)
        for note in notes:
            self.accelerator.print(f"note: {note}")
        resume = resolve_resume(self.output_dir, args.resume_from_checkpoint)
        self._prepare_output_dir()

        set_seed(args.seed)
        model = build_model(
            model_name_or_path=model_args.model_name_or_path,
            config_name=model_args.config_name,
            mask_ratio=model_args.mask_ratio,
            norm_pix_loss=model_args.norm_pix_loss,
        )
        self.config = model.config
        self._build_data()
        processes = self.accelerator.num_processes
        effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        optimizer = torch.optim.AdamW(
            parameter_groups(model, args.weight_decay),
            lr=_peak_lr(args, effective_batch),  # the scheduler scales it every step
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        self.model, self.optimizer = self._prepare(model, optimizer)
        self.plan = _plan(args, self.dataloader, effective_batch)
        # prepared so that save_state / load_state carry it; stepped once per optimizer step (see _build_accelerator)
        self.scheduler = self.accelerator.prepare(
            build_lr_scheduler(
                optimizer,
                minimum=args.min_lr,
                warmup_steps=self.plan.warmup_steps,
                total_steps=self.plan.total_steps,
            )
        )

        self.state = TrainState()
        if resume is not None:
            self.accelerator.load_state(str(resume))
            self.state = TrainState.load(resume)
            self.accelerator.print(f"resumed from {resume} at step {self.state.step}")
        self.log = StepLog(self.output_dir / "log.jsonl")
        if self.accelerator.is_main_process:
            self.log.truncate_after(self.state.step)
        if self.accelerator.log_with:
            self.accelerator.init_trackers(
                "usfmae-pretraining", config=_tracker_config(model_args, data_args, args, self.plan)
            )
        self.processor = build_image_processor(self.config.image_size)
        self.card_training = {
            "recipe": args.recipe,
            "initialised from": Path(model_args.model_name_or_path).name
            if model_args.model_name_or_path
            else "scratch (MAE init)",
            "effective batch size": self.plan.effective_batch_size,
            "peak learning rate": self.plan.peak_lr,
            "mask ratio": self.config.mask_ratio,
            "norm_pix_loss": self.config.norm_pix_loss,
        }

    # -------------------------------------------------------------- setup

    def _prepare_output_dir(self) -> None:
        if self.accelerator.is_main_process:
            if self.args.resume_from_checkpoint is None and (self.output_dir / "log.jsonl").exists():
                raise UsfmaeError(
                    f"{self.output_dir} holds a run; pass --resume_from_checkpoint latest or another --output_dir"
                )
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.output_dir)
        self.accelerator.wait_for_everyone()

    def _build_data(self) -> None:
        """Training dataset and loader, device-side augmentation (if any) and the preview images."""
        data_args, args, accelerator = self.data_args, self.args, self.accelerator
        image_size = self.config.image_size
        if data_args.augment_on_device:
            worker_transform, self.device_transform = build_split_train_transform(args.augmentation, image_size)
        else:
            worker_transform, self.device_transform = build_train_transform(args.augmentation, image_size), None
        with accelerator.main_process_first():  # one process fills the datasets cache, the others reuse it
            source, column = load_source(
                dataset_dir=data_args.dataset_dir,
                train_dir=data_args.train_dir,
                dataset_name=data_args.dataset_name,
                dataset_config_name=data_args.dataset_config_name,
                split=data_args.dataset_split,
                image_column=data_args.image_column,
                streaming=data_args.streaming,
            )
        if data_args.max_train_samples is not None:
            source = _head(source, data_args.max_train_samples)
        make_sample = SampleMaker(worker_transform, (image_size // self.config.patch_size) ** 2, args.seed)
        if data_args.streaming:
            from datasets.distributed import split_dataset_by_node

            shard = split_dataset_by_node(source, accelerator.process_index, accelerator.num_processes)
            shuffled = shard.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer_size)
            self.dataset = StreamingImages(shuffled, make_sample, column, accelerator.process_index)
        else:
            self.dataset = MapStyleImages(source, make_sample, column)
        self.dataloader = DataLoader(
            self.dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=not data_args.streaming,
            drop_last=True,
            collate_fn=collate,
            num_workers=data_args.dataloader_num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        self.preview = _reconstruction_inputs(data_args, source, column, image_size)

    def _prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        accelerator, args = self.accelerator, self.args
        if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed cannot infer it from an unprepared stream
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
                args.per_device_train_batch_size
            )
        if self.data_args.streaming:  # each process reads its own shard; nothing to re-shard
            return accelerator.prepare(model, optimizer)
        model, optimizer, self.dataloader = accelerator.prepare(model, optimizer, self.dataloader)
        if len(self.dataloader) == 0:
            raise UsfmaeError(
                f"{len(self.dataset)} images are fewer than one global batch of "
                f"{args.per_device_train_batch_size * accelerator.num_processes}"
            )
        return model, optimizer

    # -------------------------------------------------------------- training

    def train(self) -> Path:
        """Train to the planned step count, then write ``final/``; return its path."""
        accelerator, state = self.accelerator, self.state
        self.model.train()
        self.window = torch.zeros(4, device=accelerator.device)  # loss sum, micro-batches, images, bad images
        self.progress = tqdm(
            total=self.plan.total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="pretraining"
        )
        while state.step < self.plan.total_steps:
            if self._train_epoch():
                state.epoch += 1
                state.samples_in_epoch = 0
        self.progress.close()
        _check_bad_fraction(state, self.data_args.max_bad_fraction, final=True)
        accelerator.print(
            f"done: {state.step} steps, {state.images_seen} images, {state.bad_images_seen} unreadable images skipped"
        )
        self.reconstruct()
        final = self.output_dir / "final"
        self.save_model(final)
        if accelerator.is_main_process:
            plot_curves(self.log.records(), self.output_dir / "training_curves.png")
        accelerator.print(f"final model: {final}")
        accelerator.end_training()
        return final

    def _train_epoch(self) -> bool:
        """Run (the rest of) the current epoch; return False if the run ended inside it."""
        accelerator, state, args = self.accelerator, self.state, self.args
        self.dataset.set_epoch(state.epoch)
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(state.epoch)
        skip = _batches_to_skip(state, args.per_device_train_batch_size, accelerator.num_processes)
        loader = accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
        window = self.window
        started, batches = time.perf_counter(), 0
        for batches, batch in enumerate(loader, start=1):  # noqa: B007 (the count is read after the loop)
            lr = self.scheduler.get_last_lr()[0]  # the lr of the update this micro-batch belongs to
            loss = self._micro_step(batch)
            images = torch.tensor(float(len(batch["pixel_values"])), device=window.device)
            window += torch.stack([loss, torch.ones_like(loss), images, batch["num_bad"].to(window.device).float()])
            state.samples_in_epoch += args.per_device_train_batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            totals = accelerator.reduce(window, reduction="sum").tolist()
            window.zero_()
            self._end_of_step(lr, totals, time.perf_counter() - started)
            started = time.perf_counter()  # images/s measures training, not saving
            if state.step >= self.plan.total_steps:
                return False
        if batches == 0 and skip == 0:
            raise UsfmaeError("the data yields no full batch; lower --per_device_train_batch_size")
        return True

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward one micro-batch (and step the optimizer when gradients sync)."""
        accelerator = self.accelerator
        pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        noise = batch["noise"].to(accelerator.device, non_blocking=True)  # per-sample masks, see data.py
        if self.device_transform is not None:
            pixel_values = self.device_transform(pixel_values, batch["augment_seed"])
        with accelerator.accumulate(self.model):
            loss = self.model(pixel_values=pixel_values, noise=noise).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.args.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    def _end_of_step(self, lr: float, totals: list[float], seconds: float) -> None:
        """Log the optimizer step just taken; checkpoint and preview on schedule."""
        accelerator, state, args = self.accelerator, self.state, self.args
        loss_sum, micro_batches, images, bad = totals
        state.step += 1
        state.images_seen += int(images)
        state.bad_images_seen += int(bad)
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / micro_batches,
            "lr": lr,
            "images_per_sec": images / max(seconds, 1e-9),
            "bad_images": int(bad),
        }
        if accelerator.is_main_process:
            self.log.append(record)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.1f}")
        if state.step % args.logging_steps == 0:
            accelerator.log({key: value for key, value in record.items() if key != "step"}, step=state.step)
            accelerator.print(
                f"step {state.step}: loss {record['loss']:.4f} lr {lr:.3g} {record['images_per_sec']:.1f} img/s, "
                f"unreadable images so far {state.bad_images_seen}"
            )
            _check_bad_fraction(state, self.data_args.max_bad_fraction, final=False)
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
            self.checkpoint()
        preview_every = args.reconstruction_steps or args.checkpointing_steps
        if preview_every and state.step % preview_every == 0:
            self.reconstruct()

    # -------------------------------------------------------------- outputs

    def checkpoint(self) -> None:
        """Save the full training state and an HF model as ``checkpoint-N``, atomically."""
        accelerator = self.accelerator
        staging = staging_dir(self.output_dir, self.state.step)
        accelerator.save_state(str(staging))
        self.save_model(staging / "model")
        if accelerator.is_main_process:
            self.state.save(staging)
            publish(staging, self.output_dir, self.state.step, self.args.save_total_limit)
            plot_curves(self.log.records(), self.output_dir / "training_curves.png")
        accelerator.wait_for_everyone()

    def reconstruct(self) -> None:
        """Reconstruction grid of the fixed preview images with fixed masks (every process runs the model)."""
        from usfmae_hf.inference.reconstruction import reconstruct

        if self.preview is None:
            return
        path = self.output_dir / "reconstructions" / f"step-{self.state.step:08d}.png"
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        output = path if self.accelerator.is_main_process else None
        reconstruct(model, self.preview, mask_ratio=self.config.mask_ratio, seed=self.args.seed, output=output)
        model.train()

    def save_model(self, directory: Path) -> None:
        """Export the current weights as an HF model directory (every process gathers, the main one writes)."""
        _export_hf_model(
            self.accelerator,
            self.model,
            self.config,
            directory,
            self.processor,
            {**self.card_training, "steps": self.state.step},
        )


def _build_accelerator(args: PretrainingArguments):
    """The ``Accelerator``: precision, accumulation, trackers, seedable sampler, optional torch.compile."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import TorchDynamoPlugin

    trackers = [name for name in args.report_to if name != "none"]
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # the schedule counts optimizer steps (the dataloader is per process); by default accelerate would step
        # it num_processes times per update and skip it on fp16-overflow steps, which MAE's schedule does not
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.torch_compile else None,
    )
    if len(accelerator.log_with) < len(trackers):
        raise UsfmaeError(f"--report_to {' '.join(trackers)}: tracker not installed or unknown to accelerate")
    return accelerator


def _head(source: Any, count: int) -> Any:
    """The first ``count`` items of a list of paths, a ``Dataset`` or an ``IterableDataset``."""
    if isinstance(source, list):
        return source[:count]
    if hasattr(source, "select"):
        return source.select(range(min(count, len(source))))
    return source.take(count)


def _plan(args: PretrainingArguments, dataloader: DataLoader, effective_batch: int) -> _Plan:
    """Total and warmup steps, and the peak lr by the linear scaling rule (unless given outright)."""
    if args.max_steps is not None:
        total = args.max_steps
    else:
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        total = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_ratio * total)
    return _Plan(
        total_steps=total,
        warmup_steps=min(warmup, total),
        peak_lr=_peak_lr(args, effective_batch),
        effective_batch_size=effective_batch,
    )


def _peak_lr(args: PretrainingArguments, effective_batch: int) -> float:
    """``--learning_rate`` if given, else the linear scaling rule on ``--base_learning_rate``."""
    if args.learning_rate is not None:
        return args.learning_rate
    return scaled_learning_rate(args.base_learning_rate, effective_batch)


def _batches_to_skip(state: TrainState, per_device_batch: int, num_processes: int) -> int:
    """Per-process micro-batches of the current epoch already consumed (any process count, same global batch)."""
    global_batch = per_device_batch * num_processes
    if state.samples_in_epoch % global_batch:
        raise UsfmaeError(
            f"cannot resume: {state.samples_in_epoch} samples into the epoch is not a multiple of the global "
            f"micro-batch {global_batch}; resume with the same global batch size"
        )
    return state.samples_in_epoch // global_batch


def _check_bad_fraction(state: TrainState, max_fraction: float, *, final: bool) -> None:
    """Fail once more than ``max_fraction`` of the samples read were unreadable."""
    read = state.images_seen + state.bad_images_seen
    if read and (final or read >= MIN_SAMPLES_FOR_BAD_CHECK) and state.bad_images_seen > max_fraction * read:
        raise UsfmaeError(
            f"{state.bad_images_seen} of {read} samples could not be decoded "
            f"({state.bad_images_seen / read:.1%} > --max_bad_fraction {max_fraction:.1%})"
        )


def _tracker_config(*groups: Any) -> dict[str, Any]:
    """All arguments as one flat dict of scalars, as trackers want their run config."""
    flat = {}
    for group in groups:
        for key, value in dataclasses.asdict(group).items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _reconstruction_inputs(
    data_args: DataArguments, source: Any, column: str | None, image_size: int
) -> torch.Tensor | None:
    """Fixed preview images (eval transform), the same on every process."""
    if data_args.num_reconstruction_images < 1:
        return None
    if data_args.validation_dir is not None:
        source, column = load_source(dataset_dir=None, train_dir=data_args.validation_dir, dataset_name=None)
    images = first_images(source, column, data_args.num_reconstruction_images)
    if not images:
        return None
    transform = build_eval_transform(image_size)
    return torch.stack([transform(image).as_subclass(torch.Tensor) for image in images])


def _export_hf_model(
    accelerator: Any, model: torch.nn.Module, config: Any, directory: Path, processor: Any, training: dict
) -> None:
    """Write ``directory`` as an HF model dir: legacy-named safetensors, processor, model card."""
    from transformers import ViTMAEForPreTraining

    from usfmae_hf.atomic import atomic_directory
    from usfmae_hf.model.conversion import save_vitmae_pretrained
    from usfmae_hf.publishing.cards import render_model_card

    state_dict = accelerator.get_state_dict(model)  # collective: every process takes part
    if not accelerator.is_main_process:
        return
    export = ViTMAEForPreTraining(config)
    # a torch.compile'd model names its weights "_orig_mod.<name>"
    export.load_state_dict({key.removeprefix("_orig_mod."): value.float().cpu() for key, value in state_dict.items()})
    with atomic_directory(directory, overwrite=True) as staging:
        save_vitmae_pretrained(export, staging, image_processor=processor)
        render_model_card("pretrained", config=config, extra={"training": training}).save(staging / "README.md")
