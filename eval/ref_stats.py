"""FID reference statistics of a folder of real images, saved as .npz with their protocol: ``stepdistill ref-stats``.

    python eval/ref_stats.py --reference_dir coco30k/ --preprocess clean --inception_weights pt_inception.pth \
        --output coco30k_clean.npz
"""

import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ref-stats", *sys.argv[1:]]))
