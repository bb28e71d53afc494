"""Images per second on the tiny-digits pipeline: the teacher (25 DDIM steps with CFG, 50 UNet evaluations per
image) against 1-, 2- and 4-evaluation samplers on the same UNet (and, with --agd DIR, the same 25 steps and
guidance through AGD adapters: 25 evaluations). A sampler that adds nothing beyond its UNet
reaches a speed-up equal to the ratio of evaluations; the table shows how close this one gets and where the rest
of the time goes.

    OMP_NUM_THREADS=1 python eval/bench_sampling.py [--model assets/tiny-digits-sd] [--num_images 250]
"""

import argparse
import logging
import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.evaluation import bench_sampling, format_bench_table  # noqa: E402
from stepdistill.toy import WORLD_DIR, data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(WORLD_DIR))
    parser.add_argument("--num_images", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agd", default=None, help="an AGD output: adds the teacher's sampler through its adapters")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = bench_sampling(args.model, data.eval_prompts(), num_images=args.num_images, batch_size=args.batch_size,
                          repeats=args.repeats, agd_dir=args.agd)
    print(format_bench_table(rows, args.num_images, args.batch_size))


if __name__ == "__main__":
    main()
