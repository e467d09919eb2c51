#!/usr/bin/env python
"""Fine-tune USF-MAE for semantic segmentation of ultrasound images with the Trainer.

The model is a stock ``DPTForSemanticSegmentation`` whose ViT backbone is the USF-MAE encoder: the
output directory loads with ``AutoModelForSemanticSegmentation`` and ``pipeline("image-segmentation")``
without this package. Every ``TrainingArguments`` flag works (``--output_dir``, ``--max_steps``,
``--eval_strategy``, ``--use_cpu``, ``--push_to_hub --hub_model_id``, ...), plus the model/loss/recipe
and data flags of ``usfmae_hf.finetuning.segmentation`` (``--help`` lists them all). Launch with
``python``, ``torchrun`` or ``accelerate launch``; on CPU-only machines use
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N``.

Example::

    python training/finetune_segmentation.py --model_name_or_path usfmae-base \\
        --task busbra_seg --data_root /data/BUSBRA --fold 1 --recipe mae --loss dice_ce \\
        --output_dir runs/busbra-seg-f1 --num_train_epochs 50 --per_device_train_batch_size 16 \\
        --eval_strategy epoch --save_strategy epoch --load_best_model_at_end --metric_for_best_model dice
"""

import sys

from usfmae_hf.finetuning.segmentation import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
