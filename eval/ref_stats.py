"""FID reference statistics of a folder of real images, saved as .npz with their protocol: ``stepdistill ref-stats``.

    python eval/ref_stats.py --reference_dir coco2014/val2014/ --preprocess crop_lanczos_256 --fid_resize clean \
        --inception_weights pt_inception.pth --keep_features --output coco2014_val_clean.npz
"""

import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ref-stats", *sys.argv[1:]]))
