"""Issue 16: a run killed with SIGKILL and resumed with ``--resume_from_checkpoint latest`` ends with the weights of
the uninterrupted run, for every method; a kill in the middle of a checkpoint save leaves the previous checkpoint,
and the resume goes on from it. The damage is real: each killed run is its own process (tests/kill_worker.py), held
at the point of the kill, and the test sends it SIGKILL. The uninterrupted and the resumed runs go through one worker
process each, all at one thread, so that every run computes with the same kernels."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, dm_args, read_logs, train_args
from safetensors.torch import load_file
from test_agd import agd_args
from test_msd_train import msd_args

from stepdistill.checkpoint import list_checkpoints, load_checkpoint

STEPS = 4
METHODS = ("lcm", "tscd", "dmd2", "sid", "agd", "msd")


def _argv(method, tiny_sd_path, digits_dir, prompts_file, out, **extra):
    extra = {"max_train_steps": STEPS, "checkpointing_steps": 2, **extra}
    if method in ("lcm", "tscd"):
        return train_args(tiny_sd_path, digits_dir, out, **extra)
    if method == "dmd2":
        return dm_args(tiny_sd_path, out, data=digits_dir, dfake_gen_update_ratio=2, **extra)
    if method == "sid":
        return dm_args(tiny_sd_path, out, prompts=prompts_file, **extra)
    if method == "agd":
        return agd_args(tiny_sd_path, out, prompts_file, **extra)
    return msd_args(tiny_sd_path, digits_dir, out, 2, use_lora="true", **extra)


def _worker(plan, path: Path) -> subprocess.Popen:
    path.write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_worker.py"), str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, timeout: float = 900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_sd_path, digits_dir, prompts_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    cases = {m: {} for m in METHODS}
    cases["lcm_in_save"] = {"checkpointing_steps": 1}
    method_of = {name: name.split("_")[0] for name in cases}
    argv = {name: {kind: _argv(method_of[name], tiny_sd_path, digits_dir, prompts_file, root / name / kind, **extra)
                   for kind in ("straight", "killed")} for name, extra in cases.items()}
    # the uninterrupted runs, all in one process
    straight = _worker([[method_of[n], argv[n]["straight"], None] for n in cases], root / "straight.json")
    # each killed run in its own process, held at its point of death, then SIGKILLed
    held = {}
    for name in cases:
        marker = root / f"{name}.paused"
        pause = {"in_save": 2, "marker": str(marker)} if name == "lcm_in_save" else \
            {"after_checkpoint": 2, "marker": str(marker)}
        held[name] = (_worker([[method_of[name], argv[name]["killed"], pause]], root / f"{name}.json"), marker)
    deadline = time.monotonic() + 900
    for name, (proc, marker) in held.items():
        while not marker.exists():
            assert proc.poll() is None, f"{name} ended before its kill: {proc.communicate()[1][-4000:]}"
            assert time.monotonic() < deadline, name
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, name
    _wait(straight)
    killed = {name: sorted(str(p.relative_to(root / name / "killed")) for p in (root / name / "killed").rglob("*")
                           if "checkpoint-" not in str(p.parent)) for name in cases}
    # what a resume finds after the kill during the save: checkpoint-1, complete (loaded here, before it is pruned)
    latest = list_checkpoints(root / "lcm_in_save" / "killed")[-1]
    killed["lcm_in_save: latest"] = (latest.name, load_checkpoint(latest, optimizers={}, schedulers={})[0])
    # the resumed runs: the killed runs' command lines plus --resume_from_checkpoint latest, in one process
    resumed = _worker([[method_of[n], argv[n]["killed"] + ["--resume_from_checkpoint", "latest"], None]
                       for n in cases], root / "resumed.json")
    _wait(resumed)
    return root, killed


def _outputs(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a run's output (students, adapters, routers), checkpoints left out."""
    return {str(f.relative_to(run)): load_file(f) for f in sorted(run.rglob("*.safetensors"))
            if not any(part.startswith(("checkpoint-", ".checkpoint-")) for part in f.relative_to(run).parts)}


@pytest.mark.parametrize("name", METHODS)
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(name, runs):
    root, killed = runs
    straight, run = root / name / "straight", root / name / "killed"
    # killed after its checkpoint at step 2: no output yet, the steps after 2 are done by the resume (MSD: its first
    # student's run, the second not begun)
    first = Path("students/0") if name == "msd" else Path()
    assert str(first / "checkpoint-2") in killed[name] and str(first / "stepdistill.json") not in killed[name], \
        killed[name]
    if name == "msd":
        assert "students/1" not in killed[name] and (run / "students/1/stepdistill.json").is_file()
    assert [r["step"] for r in read_logs(run / first)][-2:] == [STEPS - 1, STEPS]
    a, b = _outputs(straight), _outputs(run)
    assert a.keys() == b.keys() and a, (a.keys(), b.keys())
    worst = max((a[f][k] - b[f][k]).abs().max().item() for f in a for k in a[f])
    assert worst <= 1e-6, (name, worst)


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint(runs):
    root, killed = runs
    run = root / "lcm_in_save" / "killed"
    # the kill came between checkpoint-2's weights and its optimizer state: only its temporary folder was written
    assert [n for n in killed["lcm_in_save"] if n.startswith(".checkpoint-2.tmp")], killed["lcm_in_save"]
    assert "checkpoint-1" in killed["lcm_in_save"] and "checkpoint-2" not in killed["lcm_in_save"]
    assert killed["lcm_in_save: latest"] == ("checkpoint-1", 1)
    # the resume went on from checkpoint-1 (its log keeps step 1 and has 2..4 anew) and ends where the uninterrupted
    # run does
    assert [r["step"] for r in read_logs(run)] == [1, 2, 3, 4]
    a, b = _outputs(root / "lcm_in_save" / "straight"), _outputs(run)
    assert a.keys() == b.keys() and max((a[f][k] - b[f][k]).abs().max().item() for f in a for k in a[f]) <= 1e-6
    assert [p.name for p in list_checkpoints(run)][-1] == "checkpoint-4"
    assert not list(run.glob(".checkpoint-*")), "the dead process's temporary folder is cleaned up by the resume"
