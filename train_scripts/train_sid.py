"""Score identity Distillation (one- or few-step SiD; long-and-short guidance, Zero-CFG, Anti-CFG). Data-free.

    accelerate launch train_scripts/train_sid.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --prompts_file PROMPTS --output_dir out/sid
    python train_scripts/train_sid.py --config train_scripts/configs/tiny_digits/sid.yaml --output_dir runs/sid
    stepdistill train sid [the same options]
"""

import sys
from pathlib import Path

# running the file directly puts train_scripts/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.api import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("sid"))
