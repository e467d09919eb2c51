"""The MAE pretraining loop on ``accelerate``: one CPU process to multi-node GPUs, resumable mid-epoch.

The loop adds next to nothing per step to a bare ``ViTMAEForPreTraining`` loop: losses stay on the device
until a logging window closes (:class:`~usfmae_hf.pretraining.reporting.StepStats`), AdamW is torch's
fused kernel where it applies, images are decoded and augmented in one-thread DataLoader workers (in the
loop itself on small CPU machines, see :func:`~usfmae_hf.pretraining.data.default_num_workers`), and
checkpoints and previews run only on their schedules, outside the timed windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import build_image_processor
from usfmae_hf.pretraining.arguments import (
    WARMUP_ROUNDING,
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    apply_recipe,
    usfmae_grid_misses,
    validate_arguments,
)
from usfmae_hf.pretraining.checkpointing import (
    TrainState,
    batches_to_skip,
    check_resumable,
    current_settings,
    prepare_output_dir,
    publish,
    resolve_resume,
    save_settings,
    saved_settings,
    staging_dir,
)
from usfmae_hf.pretraining.data import build_training_data, check_bad_fraction, default_num_workers
from usfmae_hf.pretraining.environment import build_accelerator, check_process_count, describe
from usfmae_hf.pretraining.export import export_hf_model
from usfmae_hf.pretraining.modeling import (
    build_lr_scheduler,
    build_model,
    build_optimizer,
    fused_adamw_supported,
    make_plan,
    peak_learning_rate,
)
from usfmae_hf.pretraining.provenance import SETTINGS_KEY as PROVENANCE_SETTING
from usfmae_hf.pretraining.provenance import RunProvenance
from usfmae_hf.pretraining.reporting import StepLog, StepStats, plot_curves, tracker_config
from usfmae_hf.pretraining.summary import end_lines, lr_plan_warnings, start_lines, training_table


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> Path:
    """Pretrain (or continue pretraining) an MAE; return the ``final/`` model directory."""
    validate_arguments(model_args, data_args, args)
    return Pretrainer(model_args, data_args, args).train()


class Pretrainer:
    """One pretraining run: set up by the constructor (resuming if asked), run by :meth:`train`."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> None:
        from accelerate.utils import set_seed

        from_recipe = "mixed_precision" in apply_recipe(model_args, args)
        self.data_args, self.args = data_args, args
        self.card_license = model_args.license
        self.output_dir = Path(args.output_dir)
        self.accelerator, self.precision = build_accelerator(args, from_recipe)
        accelerator = self.accelerator
        self._note(check_process_count(accelerator.num_processes), "warning")
        resume = resolve_resume(self.output_dir, args.resume_from_checkpoint)
        set_seed(args.seed)
        model = build_model(  # before the output folder is made: a model that is not found leaves nothing behind
            model_name_or_path=model_args.model_name_or_path,
            config_name=model_args.config_name,
            mask_ratio=model_args.mask_ratio,
            norm_pix_loss=model_args.norm_pix_loss,
        )
        if accelerator.is_main_process:
            self._note(
                prepare_output_dir(
                    self.output_dir,
                    resuming=args.resume_from_checkpoint is not None,
                    overwrite=args.overwrite_output_dir,
                )
            )
        accelerator.wait_for_everyone()
        self.config = model.config
        if data_args.dataloader_num_workers is None:
            data_args.dataloader_num_workers = default_num_workers(accelerator.device)
        data = build_training_data(data_args, args, self.config, accelerator)
        self.dataset, self.dataloader, self.device_transform, self.preview = data
        processes = accelerator.num_processes
        effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        self.fused = fused_adamw_supported(accelerator.device, accelerator.distributed_type.value)
        scaling_batch = args.lr_scaling_batch_size or effective_batch
        optimizer = build_optimizer(
            model,
            lr=peak_learning_rate(args.learning_rate, args.base_learning_rate, scaling_batch),
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            fused=self.fused,
            decay_all=args.decay_all_parameters,
        )
        self.model, self.optimizer = self._prepare(model, optimizer)
        self.plan = make_plan(
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            micro_batches_per_epoch=0 if data_args.streaming else len(self.dataloader),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            warmup_steps=args.warmup_steps,
            warmup_ratio=args.warmup_ratio,
            peak_lr=optimizer.defaults["lr"],
            min_lr=args.min_lr,
            effective_batch_size=effective_batch,
            warmup_rounding=WARMUP_ROUNDING[args.recipe],
        )
        self.settings = current_settings(self.config, optimizer, self._run_settings(), self.precision.name)

        self.state = TrainState()
        if resume is not None:
            for note in check_resumable(resume, self.settings):
                self._note(note)
            accelerator.load_state(str(resume))
            self.state = TrainState.load(resume)
            self._note(f"resumed from {resume} at step {self.state.step}")
        self.provenance = RunProvenance.start(  # what the cards say
            model_args,
            data_args,
            self.settings["run"]["dataset_size"],
            saved=saved_settings(resume).get(PROVENANCE_SETTING) if resume is not None else None,
            step=self.state.step,
            note=self._note,
        )
        self.settings[PROVENANCE_SETTING] = self.provenance.settings()
        # rebuilt from the step, never loaded; stepped by the loop once per optimizer step, not by accelerate
        self.scheduler = build_lr_scheduler(
            optimizer,
            minimum=args.min_lr,
            warmup_steps=self.plan.warmup_steps,
            total_steps=self.plan.total_steps,
            start_step=self.state.step,
        )
        self.log = StepLog(self.output_dir / "log.jsonl")
        if accelerator.is_main_process:
            self.log.truncate_after(self.state.step)
        if accelerator.log_with:
            accelerator.init_trackers(
                "usfmae-pretraining", config=tracker_config(model_args, data_args, args, self.plan)
            )
        self.processor = build_image_processor(self.config.image_size)
        self.card_training = training_table(
            args,
            self.plan,
            scaling_batch=scaling_batch,
            precision=describe(self.precision),
            initialised_from=self.provenance.start_name(),
            config=self.config,
        )

    # -------------------------------------------------------------- setup

    def _note(self, text: str, kind: str = "note") -> None:
        if text:
            self.accelerator.print(f"{kind}: {text}")

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

    def _run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (see checkpointing.check_resumable)."""
        args, plan = self.args, self.plan
        return {
            "effective_batch_size": plan.effective_batch_size,
            "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps,
            "peak_lr": plan.peak_lr,
            "min_lr": plan.min_lr,
            "max_grad_norm": args.max_grad_norm,
            "dataloader_drop_last": args.dataloader_drop_last,
            "seed": args.seed,
            "augmentation": args.augmentation,
            "augment_on_device": self.data_args.augment_on_device,
            "dataset_size": None if self.data_args.streaming else len(self.dataset),
        }

    # -------------------------------------------------------------- training

    def train(self) -> Path:
        """Train to the planned step count, then write ``final/``; return its path."""
        accelerator, state, args = self.accelerator, self.state, self.args
        for line in start_lines(
            processes=accelerator.num_processes,
            distributed_type=accelerator.distributed_type.value,
            device=accelerator.device,
            precision=f"{describe(self.precision)}, {'fused' if self.fused else 'default'} AdamW",
            threads=torch.get_num_threads(),
            workers=self.data_args.dataloader_num_workers,
            per_device_batch=args.per_device_train_batch_size,
            accumulation=args.gradient_accumulation_steps,
            plan=self.plan,
            optimizer=self.card_training,
            dataset_size=self.settings["run"]["dataset_size"],
            output_dir=self.output_dir,
            start_step=state.step,
        ):
            accelerator.print(line)
        for warning in lr_plan_warnings(self.plan):
            self._note(warning, "warning")
        misses = usfmae_grid_misses(args)
        if misses:
            self._note(f"not one of USF-MAE's notebook runs: {'; '.join(misses)}", "warning")
        self.model.train()
        self.stats = StepStats(accelerator.device)
        self.progress = tqdm(
            total=self.plan.total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="pretraining"
        )
        while state.step < self.plan.total_steps:
            if self._train_epoch():
                state.epoch += 1
                state.samples_in_epoch = 0
        self._flush()
        self.progress.close()
        check_bad_fraction(state.images_seen, state.bad_images_seen, self.data_args.max_bad_fraction, final=True)
        self.reconstruct()
        final = self.output_dir / "final"
        self.save_model(final)
        if accelerator.is_main_process:
            records = self.log.records()
            plot_curves(records, self.output_dir / "training_curves.png")
            for line in end_lines(records, self.output_dir, final, state.bad_images_seen, state.images_seen):
                accelerator.print(line)
        accelerator.end_training()
        return final

    def _train_epoch(self) -> bool:
        """Run (the rest of) the current epoch; return False if the run ended inside it."""
        accelerator, state, args = self.accelerator, self.state, self.args
        self.dataset.set_epoch(state.epoch)
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(state.epoch)
        skip = batches_to_skip(state, args.per_device_train_batch_size, accelerator.num_processes)
        loader = accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
        batches = 0
        for batches, batch in enumerate(loader, start=1):  # noqa: B007 (the count is read after the loop)
            lr = self.scheduler.get_last_lr()[0]  # the lr of the update this micro-batch belongs to
            loss = self._micro_step(batch)
            self.stats.add_micro_batch(loss, len(batch["pixel_values"]), batch["num_bad"])
            state.samples_in_epoch += args.per_device_train_batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            self.stats.end_step(step=state.step, epoch=state.epoch, lr=lr)
            self.progress.update(1)
            self._end_of_step()
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
        return loss

    def _end_of_step(self) -> None:
        """Log, checkpoint and preview on their schedules (the only places the host waits for the device)."""
        step, args = self.state.step, self.args
        log_now = step % args.logging_steps == 0
        save_now = bool(args.checkpointing_steps) and step % args.checkpointing_steps == 0
        preview_every = args.reconstruction_steps or args.checkpointing_steps
        preview_now = bool(preview_every) and step % preview_every == 0
        if not (log_now or save_now or preview_now):
            return
        records = self._flush()
        if log_now:
            record = records[-1]
            self.accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
            self.accelerator.print(
                f"step {step}: loss {record['loss']:.4f} lr {record['lr']:.3g} {record['images_per_sec']:.1f} img/s, "
                f"unreadable images so far {self.state.bad_images_seen}"
            )
            check_bad_fraction(
                self.state.images_seen, self.state.bad_images_seen, self.data_args.max_bad_fraction, final=False
            )
        if save_now:
            self.checkpoint()
        if preview_now:
            self.reconstruct()
        self.stats.restart_clock()  # images/s measures training, not saving

    def _flush(self) -> list[dict[str, Any]]:
        """Read the pending steps back from the device, count them in the state and append them to the log."""
        records = [{**record, "precision": self.precision.name} for record in self.stats.flush(self.accelerator)]
        for record in records:
            self.state.images_seen += record.pop("images")
            self.state.bad_images_seen += record["bad_images"]
        if records:
            if self.accelerator.is_main_process:
                self.log.append(records)
            self.progress.set_postfix(loss=f"{records[-1]['loss']:.4f}", img_s=f"{records[-1]['images_per_sec']:.1f}")
        return records

    # -------------------------------------------------------------- outputs

    def checkpoint(self) -> None:
        """Save the full training state, run settings and an HF model as ``checkpoint-N``, atomically."""
        accelerator = self.accelerator
        staging = staging_dir(self.output_dir, self.state.step)
        accelerator.save_state(str(staging))
        self.save_model(staging / "model")
        if accelerator.is_main_process:
            self.state.save(staging)
            save_settings(staging, self.settings)
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
        export_hf_model(self.accelerator, self.model, self.config, directory, self.processor, self._card())

    def _card(self) -> dict[str, Any]:
        """The model card's facts (``render_model_card`` keywords) after the steps, images and epochs run so far."""
        state, args = self.state, self.args
        epochs = None
        if not self.data_args.streaming:  # an epoch is every per-process batch, on every process
            per_epoch = len(self.dataloader) * args.per_device_train_batch_size * self.accelerator.num_processes
            epochs = state.epoch + state.samples_in_epoch / per_epoch
        table = {
            **self.card_training,
            "optimizer steps run": state.step,
            "epochs run": "not known (streamed)" if epochs is None else round(epochs, 2),
            "images seen": state.images_seen,
        }
        return {
            "initialised_from": self.provenance.initialised_from,
            "training_run": self.provenance.training_run(state, epochs),
            "datasets": self.provenance.hub_datasets() or None,
            "license": self.card_license,
            "extra": {"training": table},
        }
