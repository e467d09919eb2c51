#!/usr/bin/env python
"""Fine-tune USF-MAE on labelled ultrasound images with the Trainer.

Every ``TrainingArguments`` flag works (``--output_dir``, ``--max_steps``, ``--eval_strategy``,
``--use_cpu``, ``--push_to_hub --hub_model_id``, ...), plus the model/recipe and data flags of
``usfmae_hf.finetuning.run`` (``--help`` lists them all). Launch with ``python``, ``torchrun`` or
``accelerate launch``; on CPU-only machines use ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N``.

Example::

    python training/finetune_classification.py --model_name_or_path usfmae-base \\
        --task busbra --data_root /data/BUSBRA --fold 1 --recipe mae \\
        --output_dir runs/busbra-f1 --num_train_epochs 50 --per_device_train_batch_size 32 \\
        --eval_strategy epoch --save_strategy epoch --load_best_model_at_end --metric_for_best_model f1_macro
"""

import sys

from usfmae_hf.finetuning.run import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
