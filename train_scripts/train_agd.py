"""Adapter guidance distillation (AGD): CFG in one forward pass.

    accelerate launch train_scripts/train_agd.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1 \
        --prompts_file prompts.txt --output_dir out/agd --guidance_range 1,12 --trajectory_steps 50
    python train_scripts/train_agd.py --config train_scripts/configs/tiny_digits/agd.yaml --output_dir runs/agd
    stepdistill train agd [the same options]

The CFG trajectories are sampled first when the folder that holds them (--trajectory_dir, or a cache folder named
after their settings) is missing or incomplete.
"""

import sys
from pathlib import Path

# running the file directly puts train_scripts/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.api import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("agd"))
