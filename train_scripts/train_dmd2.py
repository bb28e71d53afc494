"""DMD2: distribution matching distillation (one step, or multi-step with backward simulation; optional GAN).

    accelerate launch train_scripts/train_dmd2.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --prompts_file PROMPTS --output_dir out/dmd2
    python train_scripts/train_dmd2.py --config train_scripts/configs/tiny_digits/dmd2.yaml --output_dir runs/dmd2
    stepdistill train dmd2 [the same options]
"""

import sys
from pathlib import Path

# running the file directly puts train_scripts/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.api import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("dmd2"))
