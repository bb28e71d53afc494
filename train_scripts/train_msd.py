"""MSD: K one-step students, each distilled (DMD2 or SiD) on its part of the prompts, and a router.

    accelerate launch train_scripts/train_msd.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --method dmd2 --num_students 4 --prompts_file PROMPTS --output_dir out/msd
    python train_scripts/train_msd.py --config train_scripts/configs/tiny_digits/msd.yaml --output_dir runs/msd
    stepdistill train msd [the same options]
"""

import sys
from pathlib import Path

# running the file directly puts train_scripts/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.api import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("msd"))
