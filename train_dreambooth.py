#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion (SD 1.x, SD 2.x, SDXL) with MoSLoRA adapters.

    python train_dreambooth.py --pretrained_model_name_or_path <hub id | folder | file.safetensors> \\
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir sks-dog

Multi-GPU: `accelerate launch --multi_gpu --num_processes 2 train_dreambooth.py ...`.
See docs/training.md for every flag; `--help` lists them too.
"""

import sys

from moslora_diffusion.training import main

if __name__ == "__main__":
    sys.exit(main())
