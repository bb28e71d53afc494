"""Trajectory segmented consistency distillation (Hyper-SD TSCD), progressive 8 → 4 → 2 → 1 segments.

    accelerate launch train_scripts/train_tscd.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --train_data_dir DATA --segments 8,4,2,1 --output_dir out/tscd
    python train_scripts/train_tscd.py --config train_scripts/configs/tiny_digits/tscd.yaml --output_dir runs/tscd
    stepdistill train tscd [the same options]
"""

import sys
from pathlib import Path

# running the file directly puts train_scripts/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.api import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("tscd"))
