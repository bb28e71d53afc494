"""Latent consistency distillation (LCM, LCM-LoRA).

    accelerate launch train_scripts/train_lcm.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir DATA --output_dir out/lcm-lora
    python train_scripts/train_lcm.py --config train_scripts/configs/tiny_digits/lcm_lora.yaml --output_dir runs/lcm
    stepdistill train lcm [the same options]
"""

import sys
from pathlib import Path

# running the file directly puts train_scripts/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.api import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("lcm"))
