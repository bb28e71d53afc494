"""The distribution-matching family on tiny-digits, one step: every ``--generator_loss`` member trained by the SAME
trainer (DMD2's, ``train_scripts/configs/tiny_digits/dmd2.yaml``: t = 625, CFG 2, TTUR 1:5, Diffusion-GAN on, full
generator) with the same budget (iterations, hence generator updates, and batch), then scored the stock way
(``stepdistill.load`` + the recipe's scheduler) on the held-out prompts: digits-FID, its ratio to the teacher's at 25
DDIM steps (CFG 3), and prompt agreement. Only the generator loss changes between rows; the learning rates are the
config's, tuned for ``dmd`` (the score-branch members, ``sid``/``sim``/``uni_instruct``, have losses of another scale
and may want their own: a first comparison, not a tuned one).

    python eval/bench_dm_family.py --budget smoke     # 5 iterations, 50 images: shows it runs (9 min on 2 busy CPU cores)
    python eval/bench_dm_family.py --budget medium    # 1000 iterations, batch 64, 1000 images: ~12 min a member at 1 thread
    python eval/bench_dm_family.py --budget timing    # 30 iterations each, one after the other: the s / iteration column
    python eval/bench_dm_family.py --budget full      # the config's 2000 iterations, batch 64, 1000 images: hours

Trained outputs go to runs/bench_dm_family/<budget>/<member>/ and a finished one is reused; the table is printed and
written to runs/bench_dm_family/<budget>/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "train_scripts" / "configs" / "tiny_digits" / "dmd2.yaml"
# row name: the options that make the member (everything else is the config's)
MEMBERS = {
    "dmd": ["--generator_loss", "dmd"],
    "diff_instruct": ["--generator_loss", "diff_instruct"],
    "sid (α = 1)": ["--generator_loss", "sid", "--alpha", "1.0"],
    "sim (pseudo-Huber)": ["--generator_loss", "sim", "--sim_distance", "pseudo_huber"],
    "fdistill (JS)": ["--generator_loss", "fdistill", "--divergence", "js"],
    "fdistill (forward KL)": ["--generator_loss", "fdistill", "--divergence", "forward_kl"],
    "uni_instruct (forward KL)": ["--generator_loss", "uni_instruct", "--divergence", "forward_kl"],
    # without the Diffusion-GAN term, where the loss allows it (f-distill and Uni-Instruct read their density ratio
    # from the GAN head: they need it)
    "dmd, no GAN": ["--generator_loss", "dmd", "--gan", "false"],
    "diff_instruct, no GAN": ["--generator_loss", "diff_instruct", "--gan", "false"],
    "sid (α = 1), no GAN": ["--generator_loss", "sid", "--alpha", "1.0", "--gan", "false"],
    "sim (pseudo-Huber), no GAN": ["--generator_loss", "sim", "--sim_distance", "pseudo_huber", "--gan", "false"],
}
# iterations (generator updates = iterations / 5 with the config's TTUR), batch, images scored
BUDGETS = {"full": (2000, 64, 1000), "medium": (1000, 64, 1000), "quick": (200, 64, 300), "timing": (30, 64, 50),
           "smoke": (5, 4, 50)}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def train(name: str, budget: str, runs_dir: Path, threads: int) -> dict:
    iterations, batch, _ = BUDGETS[budget]
    out = runs_dir / slug(name)
    record_file = out / "bench_train.json"
    if record_file.is_file() and (out / "stepdistill.json").is_file():
        return json.loads(record_file.read_text())
    argv = [sys.executable, str(REPO / "train_scripts" / "train_dmd2.py"), "--config", str(CONFIG),
            "--output_dir", str(out), "--max_train_steps", str(iterations), "--train_batch_size", str(batch),
            "--checkpointing_steps", str(max(iterations // 2, 1)), "--validation_steps", "0",
            "--resume_from_checkpoint", "latest", *MEMBERS[name]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"[bench] training {name}: {iterations} iterations, batch {batch}", flush=True)
    start = time.perf_counter()
    if subprocess.run(argv, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"[bench] training {name} failed: {' '.join(argv)}")
    record = {"member": name, "options": MEMBERS[name], "iterations": iterations, "batch": batch,
              "train_minutes": (time.perf_counter() - start) / 60}
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def seconds_per_iteration(run_dir: Path) -> float:
    """Mean logged seconds per iteration after the first 5 (warm-up), over whole TTUR cycles of 5 iterations (one
    generator update each)."""
    steps = [json.loads(line) for line in (run_dir / "logs.jsonl").read_text().splitlines() if line.strip()]
    times = [r["sec_per_step"] for r in steps if r["step"] > 5 and "sec_per_step" in r]
    times = times[: len(times) // 5 * 5] or times
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="smoke", choices=sorted(BUDGETS))
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    parser.add_argument("--runs_dir", default=None, help="default: runs/bench_dm_family/BUDGET")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count()))
    args = parser.parse_args()

    import torch

    from stepdistill.toy import WORLD_DIR
    from stepdistill.toy.evaluate import DigitsJudge, quality_table, student_table

    torch.set_num_threads(args.threads)
    iterations, batch, num_images = BUDGETS[args.budget]
    runs_dir = Path(args.runs_dir or REPO / "runs" / "bench_dm_family" / args.budget)
    runs_dir.mkdir(parents=True, exist_ok=True)
    teacher_file = runs_dir / f"teacher-{num_images}.json"
    if teacher_file.is_file():
        teacher = json.loads(teacher_file.read_text())
    else:
        print(f"[bench] teacher: DDIM 25 steps, CFG 3, {num_images} images", flush=True)
        teacher = quality_table(WORLD_DIR, num_images=num_images, steps=[25], guidance_scale=3.0, batch_size=250,
                                progress=False)
        teacher_file.write_text(json.dumps(teacher, indent=1) + "\n")
    teacher_fid = teacher["rows"][0]["digits_fid"]
    judge = DigitsJudge.from_world(WORLD_DIR)
    lines = [f"tiny-digits, one step, DMD2's trainer and config for every member; {iterations} iterations "
             f"({iterations // 5} generator updates), batch {batch}, {num_images} held-out prompts scored, "
             f"{args.threads} thread(s); teacher digits-FID {teacher_fid:.3f} (25 DDIM steps, CFG 3).", "",
             "| `--generator_loss` | options | digits-FID | FID / teacher | prompt agreement | training min | s / iteration |",
             "|---|---|---|---|---|---|---|"]
    for name in args.members:
        record = train(name, args.budget, runs_dir, args.threads)
        score_file = runs_dir / slug(name) / f"score-{num_images}.json"
        if score_file.is_file():
            r = json.loads(score_file.read_text())
        else:
            rows, _ = student_table(WORLD_DIR, runs_dir / slug(name), [1], num_images=num_images, batch_size=250,
                                    judge=judge, progress=False)
            r = rows[0]
            score_file.write_text(json.dumps(r, indent=1) + "\n")
        lines.append(f"| {name} | `{' '.join(MEMBERS[name])}` | {r['digits_fid']:.3f} | "
                     f"{r['digits_fid'] / teacher_fid:.2f}x | {100 * r['prompt_agreement']:.1f} % | "
                     f"{record['train_minutes']:.1f} | {seconds_per_iteration(runs_dir / slug(name)):.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.members == list(MEMBERS):  # a partial run (--members) prints its rows but leaves the table alone
        (runs_dir / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
