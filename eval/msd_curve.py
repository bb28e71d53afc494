"""The MSD budget curve on tiny-digits: digits-FID of K = 1, 2, 4 one-step students at equal total training compute
(K students x N/K iterations, or N/2 for one student whose generator then starts K students of N/2K each) and at
equal iterations per student (K x N), from `stepdistill toy quality
--output_json` files; prints the table and writes the plot.

    python eval/msd_curve.py --teacher_fid 7.060 --plot assets/figures/msd_curve.png \
        "equal compute:1:2000:runs/dmd2.json" "equal compute:2:1000:runs/msd_k2_1000.json" ...
"""

import argparse
import json
import sys
from pathlib import Path

# running the file directly puts eval/ on sys.path, not the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.plots import plot_series  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", help="SERIES:K:ITERATIONS_PER_STUDENT:QUALITY_JSON, or "
                                                "SERIES:K:ITERATIONS_PER_STUDENT:=FID,AGREEMENT for a recorded figure; "
                                                "ITERATIONS_PER_STUDENT may be PER+SHARED: students started from one "
                                                "student trained SHARED iterations (dmd2_then_msd.yaml)")
    parser.add_argument("--teacher_fid", type=float, required=True)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    series: dict[str, list[tuple[float, float]]] = {}
    print("| series | K | iterations per student | total iterations | digits-FID | FID / teacher | prompt agreement |")
    print("|---|---|---|---|---|---|---|")
    for item in args.rows:
        name, k, iterations, source = item.rsplit(":", 3)
        if source.startswith("="):  # a figure recorded by an earlier run whose json is not at hand: =FID,AGREEMENT
            fid, agreement = map(float, source[1:].split(","))
            row = {"digits_fid": fid, "prompt_agreement": agreement}
        else:
            row = next(r for r in json.loads(Path(source).read_text())["rows"] if r["nfe"] == 1)
        per, _, shared = iterations.partition("+")
        k, per, shared = int(k), int(per), int(shared or 0)
        label = f"{shared} shared + {per}" if shared else str(per)
        print(f"| {name} | {k} | {label} | {shared + k * per} | {row['digits_fid']:.3f} | "
              f"{row['digits_fid'] / args.teacher_fid:.2f}x | {100 * row['prompt_agreement']:.1f} % |")
        series.setdefault(name, []).append((k, row["digits_fid"]))
    if args.plot:
        plot_series(series, args.plot, "MSD on tiny-digits: one step, digits-FID", "K (students)", "digits-FID")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
