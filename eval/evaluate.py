"""Generate images from a base pipeline or a stepdistill output and score them: ``stepdistill eval``.

    python eval/evaluate.py --student runs/lcm --captions_file assets/prompts/coco2014-30k-gigagan.txt \
        --metrics fid kid clip --reference_stats coco2014_val_clean.npz --preprocess crop_lanczos_256 \
        --fid_resize clean --clip_protocol paper --clip_model laion/CLIP-ViT-g-14-laion2B-s12B-b42K \
        --output_dir runs/lcm/eval
"""

import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
