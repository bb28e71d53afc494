"""Generate images from a base pipeline or a stepdistill output and score them: ``stepdistill eval``.

    python eval/evaluate.py --student runs/lcm --captions_file captions_val2014.json --num_images 30000 \
        --metrics fid clip --reference_stats coco30k_clean.npz --preprocess clean --clip_model CLIP_DIR \
        --output_dir runs/lcm/eval
"""

import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
