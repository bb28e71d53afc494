"""`make bench` end to end at the smoke budget on one method: the table, the JSON, the plot, and a rerun that reuses
the trained output."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_writes_the_table_json_and_plot_and_reuses_finished_training(tmp_path):
    out, runs = tmp_path / "bench", tmp_path / "runs"
    argv = [sys.executable, str(REPO / "eval" / "bench_methods.py"), "--budget", "smoke", "--methods", "lcm_lora",
            "--output_dir", str(out), "--runs_dir", str(runs), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    teacher = [r for r in results["rows"] if r["method"].startswith("teacher")]
    student = [r for r in results["rows"] if r["method"] == "lcm_lora"]
    assert [(r["steps"], r["nfe"]) for r in teacher] == [(1, 2), (2, 4), (4, 8), (8, 16), (25, 50)]  # CFG: 2 per step
    assert [(r["steps"], r["nfe"]) for r in student] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert results["teacher_fid_25"] == teacher[-1]["digits_fid"] > 0
    record = student[0]["train"]
    assert record["iterations"] == 3 and record["train_minutes"] > 0 and record["peak_rss_mb"] > 100
    assert all(r["images_per_second"] > 0 and 0 <= r["prompt_agreement"] <= 1 for r in results["rows"])
    text = (out / "RESULTS.md").read_text()
    assert "| lcm_lora | 4 | 4 |" in text and "BENCH_BUDGET=smoke make bench" in text
    assert (out / "fid_vs_nfe.png").stat().st_size > 1000

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "[bench] training" not in proc.stdout  # the finished output is reused
    assert "[bench] teacher" not in proc.stdout
    assert json.loads((out / "results.json").read_text())["rows"][-1]["train"] == record
