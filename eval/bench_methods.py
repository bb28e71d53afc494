"""`make bench`: every method on the tiny-digits world with its shipped config, one table and one plot.

Each method trains through its own train script (a subprocess: training minutes are its wall clock, peak memory its
peak RSS from os.wait4), then is scored the stock way (`stepdistill.load` + the recipe's scheduler) at 1, 2, 4 and 8
steps where it samples at them, on the held-out evaluation prompts: digits-FID, its ratio to the teacher's at 25
DDIM steps (CFG 3), prompt agreement, UNet evaluations per image (counted by a hook) and images per second (the
scoring pass itself). The teacher's DDIM curve is the reference line of the plot.

    python eval/bench_methods.py --budget full            # the shipped configs: hours on 2 CPU cores
    BENCH_BUDGET=quick make bench                          # a tenth of the iterations, 300 images per setting

Writes bench/RESULTS.md, bench/results.json and bench/fid_vs_nfe.png; trained outputs go to runs/bench/<budget>/
and a finished one is reused when the script runs again (an interrupted bench loses only the method in training).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # running the file directly puts eval/ on sys.path, not the repository root

CONFIGS = REPO / "train_scripts" / "configs" / "tiny_digits"
# name: (train script's method, shipped config, step counts it samples at)
METHODS = {
    "lcm_lora": ("lcm", "lcm_lora.yaml", [1, 2, 4, 8]),
    "tscd": ("tscd", "tscd.yaml", [1, 2, 4, 8]),
    "dmd2": ("dmd2", "dmd2.yaml", [1]),
    "dmd2_4step": ("dmd2", "dmd2_4step.yaml", [4]),
    "sid": ("sid", "sid.yaml", [1]),
    "sid_4step": ("sid", "sid_4step.yaml", [4]),
    "agd": ("agd", "agd.yaml", [1, 2, 4, 8]),  # the base sampler with guidance in one pass: NFE = steps
    "msd": ("msd", "msd.yaml", [1]),
}
# fraction of the shipped iterations (and of AGD's trajectories), images per scored setting
BUDGETS = {"full": (1.0, 1000), "quick": (0.1, 300), "smoke": (0.002, 100)}
TEACHER_STEPS = [1, 2, 4, 8, 25]


def _config(name: str) -> dict:
    import yaml

    return yaml.safe_load((CONFIGS / METHODS[name][1]).read_text())


def train(name: str, budget: str, runs_dir: Path, threads: int) -> dict:
    """Train ``name`` at ``budget`` (reusing a finished output of the same budget); returns its training record."""
    method, config_file, _ = METHODS[name]
    out = runs_dir / name
    record_file = out / "bench_train.json"
    if record_file.is_file() and (out / "stepdistill.json").is_file():
        return json.loads(record_file.read_text())
    fraction = BUDGETS[budget][0]
    config = _config(name)
    steps = max(2, math.ceil(config["max_train_steps"] * fraction))
    argv = [sys.executable, str(REPO / "train_scripts" / f"train_{method}.py"), "--config", str(CONFIGS / config_file),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--resume_from_checkpoint", "latest"]
    if "num_trajectories" in config and fraction < 1:
        argv += ["--num_trajectories", str(max(8, math.ceil(config["num_trajectories"] * fraction)))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    print(f"[bench] training {name}: {steps} iterations ({budget})", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] training {name} failed (exit {proc.returncode}): {' '.join(argv)}")
    record = {"method": name, "iterations": steps, "budget": budget, "threads": threads,
              "train_minutes": (time.perf_counter() - start) / 60,
              "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux: kilobytes
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def score(name: str, out: Path, num_images: int, judge) -> list[dict]:
    from stepdistill.toy import WORLD_DIR
    from stepdistill.toy.evaluate import student_table

    rows, _ = student_table(WORLD_DIR, out, METHODS[name][2], num_images=num_images, batch_size=250, judge=judge,
                            progress=False)
    return rows


def table(results: dict) -> str:
    teacher = results["teacher_fid_25"]
    lines = ["| method | steps | UNet evals / image | digits-FID | FID / teacher (25 steps) | prompt agreement | "
             "training min | peak RSS (MB) | images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        train_ = r.get("train") or {}  # the teacher's rows: nothing trained
        minutes, rss = train_.get("train_minutes"), train_.get("peak_rss_mb")
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['digits_fid']:.3f} | "
                     f"{r['digits_fid'] / teacher:.2f}x | {100 * r['prompt_agreement']:.1f} % | "
                     f"{'—' if minutes is None else f'{minutes:.1f}'} | {'—' if rss is None else f'{rss:.0f}'} | "
                     f"{r['images_per_second']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default=os.environ.get("BENCH_BUDGET", "full"), choices=sorted(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output_dir", default=str(REPO / "bench"))
    parser.add_argument("--runs_dir", default=None, help="default: runs/bench/BUDGET")
    parser.add_argument("--num_images", type=int, default=None, help="images per scored setting (budget default)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count()))
    args = parser.parse_args()

    import torch

    from stepdistill.plots import plot_series
    from stepdistill.toy import WORLD_DIR
    from stepdistill.toy.evaluate import DigitsJudge, quality_table

    torch.set_num_threads(args.threads)
    num_images = args.num_images or BUDGETS[args.budget][1]
    runs_dir = Path(args.runs_dir or REPO / "runs" / "bench" / args.budget)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)

    teacher_file = runs_dir / f"teacher-{num_images}.json"  # reused by a rerun, like the trained outputs
    if teacher_file.is_file():
        teacher = json.loads(teacher_file.read_text())
    else:
        print(f"[bench] teacher: DDIM {TEACHER_STEPS} steps, CFG 3, {num_images} images each", flush=True)
        teacher = quality_table(WORLD_DIR, num_images=num_images, steps=TEACHER_STEPS, guidance_scale=3.0,
                                batch_size=250, progress=False)
        runs_dir.mkdir(parents=True, exist_ok=True)
        teacher_file.write_text(json.dumps(teacher, indent=1) + "\n")
    rows = [{"method": "teacher (DDIM, CFG 3)", **r} for r in teacher["rows"]]
    judge = DigitsJudge.from_world(WORLD_DIR)
    for name in args.methods:
        record = train(name, args.budget, runs_dir, args.threads)
        print(f"[bench] scoring {name} at {METHODS[name][2]} steps", flush=True)
        rows += [{"method": name, **r, "train": record} for r in score(name, runs_dir / name, num_images, judge)]
    teacher_25 = next(r["digits_fid"] for r in teacher["rows"] if r["steps"] == 25)
    results = {"date": started.strftime("%Y-%m-%d"), "budget": args.budget, "num_images": num_images,
               "threads": args.threads, "command": f"BENCH_BUDGET={args.budget} make bench",
               "teacher_fid_25": teacher_25, "real_vs_real_fid": teacher["real_vs_real_fid"], "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(r["method"], []).append((r["nfe"], r["digits_fid"]))
    plot_series(series, out_dir / "fid_vs_nfe.png", f"tiny-digits, {args.budget} budget: digits-FID against UNet "
                "evaluations", "UNet evaluations per image (log)", "digits-FID (log)", width=560, height=360, log_x=True, log_y=True,
                label_points=False)
    text = (f"# stepdistill bench ({args.budget} budget)\n\n{results['date']}, `{results['command']}`, "
            f"{num_images} held-out prompts per setting, {args.threads} thread(s); digits-FID real vs real "
            f"{teacher['real_vs_real_fid']:.3f}.\n\n{table(results)}\n\n![digits-FID against UNet evaluations]"
            "(fid_vs_nfe.png)\n")
    (out_dir / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
