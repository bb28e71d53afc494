"""Images per second and UNet size of stepdistill outputs on the tiny-digits pipeline, each sampled with its own
recipe (e.g. a full-width and a half-width one-step student, an MSD output), through the evaluation's sampler.

    OMP_NUM_THREADS=1 python eval/bench_outputs.py full=runs/dmd2 half=runs/msd_half [--teacher]
"""

import argparse
import logging
import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.evaluation import bench_outputs, format_outputs_table  # noqa: E402
from stepdistill.toy import WORLD_DIR, data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outputs", nargs="+", help="NAME=DIR of each stepdistill output")
    parser.add_argument("--model", default=str(WORLD_DIR))
    parser.add_argument("--teacher", action="store_true", help="add the base model (25 DDIM steps, CFG 3)")
    parser.add_argument("--num_images", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    outputs = {"teacher (DDIM 25, CFG 3)": None} if args.teacher else {}
    for item in args.outputs:
        name, sep, path = item.rpartition("=")
        if not sep:
            parser.error(f"{item!r}: expected NAME=DIR")
        outputs[name] = path
    rows = bench_outputs(args.model, outputs, data.eval_prompts(), num_images=args.num_images,
                         batch_size=args.batch_size, repeats=args.repeats)
    print(f"{args.num_images} images per pass, {args.batch_size} latents per UNet call, fastest of {args.repeats} "
          "timed passes\n")
    print(format_outputs_table(rows))


if __name__ == "__main__":
    main()
