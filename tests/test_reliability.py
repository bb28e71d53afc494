"""Reliability (issue 16), each shown by doing the damage for real: SIGTERM (one process, and one worker of a
2-process torchrun) saves a checkpoint and exits 0; a NaN/inf loss stops the run (or, --on_nan skip, drops the
update); a full disk during a checkpoint or the final output leaves nothing half-written and the last checkpoint
usable."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_logs, train_args
from safetensors.torch import load_file

import stepdistill.checkpoint as ck
from stepdistill.api import main as run
from stepdistill.methods import get_method
from stepdistill.methods.base import PhaseOutput
from stepdistill.recipe import LORA_WEIGHTS_NAME

LCM = get_method("lcm")
COMMON = dict(learning_rate=1e-3, checkpoints_total_limit=10)


def _lora(output_dir):
    return load_file(Path(output_dir) / LORA_WEIGHTS_NAME)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _leftovers(out: Path) -> list[str]:
    """Temporaries of checkpoint or output writes."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------- SIGTERM
def _wait_for_steps(out: Path, proc, steps: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        if (out / "logs.jsonl").is_file() and len(read_logs(out)) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} logged steps within {timeout} s")


def _stop_and_wait(proc, pid: int, timeout: float = 60) -> float:
    """SIGTERM to ``pid``; the seconds until ``proc`` exits."""
    t0 = time.time()
    os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {timeout} s after SIGTERM")
    return time.time() - t0


def _check_preempted(out: Path, err: str) -> int:
    """One complete checkpoint of the last logged step, no final output, the resume hint logged; its step."""
    found = ck.list_checkpoints(out)
    assert len(found) == 1, found
    step = json.loads((found[0] / ck.STATE_NAME).read_text())["step"]
    assert found[0].name == f"checkpoint-{step}" and step == read_logs(out)[-1]["step"]
    assert {p.name for p in found[0].iterdir()} == {"student.safetensors", "optimizer-student.safetensors",
                                                    ck.STATE_NAME}
    assert not (out / LORA_WEIGHTS_NAME).exists() and not (out / "stepdistill.json").exists()
    assert _leftovers(out) == []
    assert "--resume_from_checkpoint latest" in err and f"checkpoint-{step}" in err, err[-2000:]
    return step


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes_exactly(tiny_sd_path, digits_dir, tmp_path):
    out = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # many steps, no periodic checkpoint: the only checkpoint is the one SIGTERM asks for
    cmd = [sys.executable, str(REPO / "train_scripts/train_lcm.py"),
           *train_args(tiny_sd_path, digits_dir, out, max_train_steps=2000, **COMMON)]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _wait_for_steps(out, proc, 2)
        seconds = _stop_and_wait(proc, proc.pid)
    text = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    step = _check_preempted(out, text)
    print(f"\nSIGTERM (1 process): exit 0 after {seconds:.2f} s, checkpoint-{step}")

    # resuming reproduces the uninterrupted run: the checkpoint holds the state of its step, whole. Both run here
    # at the killed process's one thread: CPU kernels round differently at another thread count (4.7e-5 apart
    # after 4 steps at pytest's default 2 threads)
    total = step + 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=total,
                                     resume_from_checkpoint="latest", **COMMON)) == 0
        straight = tmp_path / "straight"
        assert run("lcm", train_args(tiny_sd_path, digits_dir, straight, max_train_steps=total, **COMMON)) == 0
    finally:
        torch.set_num_threads(threads)
    diff = _max_diff(_lora(straight), _lora(out))
    print(f"resumed vs uninterrupted, {total} steps: max |LoRA difference| {diff:.3g}")
    assert diff <= 1e-6
    assert [r["step"] for r in read_logs(out)] == list(range(1, total + 1))


def _worker_pids(launcher_pid: int, count: int, timeout: float = 120) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None:
                ranks[int(rank)] = child.pid
        if len(ranks) == count:
            return ranks
        time.sleep(0.2)
    raise AssertionError("the workers did not start")


def test_sigterm_to_one_worker_stops_every_process_with_one_checkpoint(tiny_sd_path, digits_dir, tmp_path):
    """torchrun --nproc_per_node 2: SIGTERM reaches rank 1 only; the processes agree (the flag is reduced each
    step), write one checkpoint together and all exit 0."""
    out = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(REPO / "train_scripts/train_lcm.py"),
           *train_args(tiny_sd_path, digits_dir, out, max_train_steps=2000, train_batch_size=2, **COMMON)]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        workers = _worker_pids(proc.pid, 2)
        _wait_for_steps(out, proc, 2)
        seconds = _stop_and_wait(proc, workers[1], timeout=90)
    text = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, text[-3000:]  # torchrun exits 0 only when every worker did
    assert "distributed: MULTI_CPU, 2 processes" in text
    step = _check_preempted(out, text)
    print(f"\nSIGTERM to rank 1 of 2: every process exited 0 after {seconds:.2f} s, checkpoint-{step}")


def test_a_repeated_sigterm_only_sets_the_flag_and_the_old_handler_comes_back_after_the_run():
    """A scheduler that signals every process of a job and torchrun, which forwards it, send a worker SIGTERM twice:
    the second must not kill the save. After the run, the handler it replaced is back."""
    from types import SimpleNamespace

    from stepdistill.trainer import Trainer

    seen = []
    before = signal.signal(signal.SIGTERM, lambda *a: seen.append("previous"))
    try:
        state = SimpleNamespace(_sigterm=False)
        previous = Trainer._catch_sigterm(state)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert state._sigterm and not seen
        signal.signal(signal.SIGTERM, previous)  # what Trainer.train does when it returns or raises
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert seen == ["previous"]
    finally:
        signal.signal(signal.SIGTERM, before)


# ------------------------------------------------------------------------------------------------------- NaN / inf
def _poison(monkeypatch, steps, term: str, value: float = float("nan")):
    """LCM's loss at the 0-based iterations ``steps``: ``term`` ("loss", the back-propagated total, or another
    logged term) becomes ``value``."""
    real = LCM.loss

    def loss(self, ctx):
        out = real(self, ctx)
        if ctx.step not in steps:
            return out
        if term == "loss":
            bad = out.loss * value
            return PhaseOutput(bad, {**out.logs, "loss": bad.detach()}, out.handoff)
        return PhaseOutput(out.loss, {**out.logs, term: torch.tensor(value)}, out.handoff)

    monkeypatch.setattr(LCM, "loss", loss)


@pytest.mark.parametrize("term, value", [("loss", float("nan")), ("loss_aux", float("inf"))])
def test_non_finite_loss_stops_before_the_update(term, value, tiny_sd_path, digits_dir, tmp_path, monkeypatch,
                                                 capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, {2}, term, value)
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=4, checkpointing_steps=2,
                                 **COMMON)) == 1
    err = _error_lines(capsys)
    assert len(err) == 1, err
    assert f"non-finite loss at step 3: {term} = {value}" in err[0] and "checkpoint-2" in err[0], err[0]
    assert "--resume_from_checkpoint latest" in err[0]
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-2"]  # nothing of the poisoned step
    assert [r["step"] for r in read_logs(out)] == [1, 2]
    assert not (out / LORA_WEIGHTS_NAME).exists() and _leftovers(out) == []
    # the kept checkpoint resumes (the data is clean again)
    monkeypatch.undo()
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=4, checkpointing_steps=2,
                                 resume_from_checkpoint="latest", **COMMON)) == 0


def test_on_nan_skip_leaves_weights_and_optimizer_unchanged(tiny_sd_path, digits_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison(monkeypatch, {2}, "loss")
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=4, checkpointing_steps=1,
                                 on_nan="skip", **COMMON)) == 0
    before, after, later = (out / f"checkpoint-{n}" for n in (2, 3, 4))
    for name in ("student.safetensors", "optimizer-student.safetensors"):
        a, b = load_file(before / name), load_file(after / name)
        assert _max_diff(a, b) == 0, name  # the skipped step changed nothing: weights, Adam's moments
        assert _max_diff(a, load_file(later / name)) > 0, name  # the next step trained again
    state = [json.loads((p / ck.STATE_NAME).read_text()) for p in (before, after)]
    assert state[0]["schedulers"] == state[1]["schedulers"]
    assert state[0]["optimizers"] == state[1]["optimizers"]  # Adam's step count too
    logs = read_logs(out)
    assert [r["nan_skips"] for r in logs] == [0, 0, 1, 1]
    assert "loss" not in logs[2] and all("loss" in logs[i] for i in (0, 1, 3))
    assert all(torch.isfinite(v).all() for v in _lora(out).values())


def test_too_many_skips_stop_the_run(tiny_sd_path, digits_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, set(range(1, 100)), "loss")
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=8, checkpointing_steps=1,
                                 on_nan="skip", max_nan_skips=2, **COMMON)) == 1
    err = _error_lines(capsys)
    assert len(err) == 1 and "non-finite loss at step 4" in err[0] and "more than --max_nan_skips 2" in err[0], err
    assert [r["nan_skips"] for r in read_logs(out)] == [0, 1, 2]
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (out / LORA_WEIGHTS_NAME).exists()


# ------------------------------------------------------------------------------------------------------- full disk
def _disk_full(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_during_a_checkpoint(tiny_sd_path, digits_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = ck.save_file

    def filling_save(tensors, path, *a, **k):
        if ".checkpoint-2." in str(path) and "optimizer" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # part of the file made it to disk
            _disk_full(path)
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", filling_save)
    args = train_args(tiny_sd_path, digits_dir, out, max_train_steps=3, checkpointing_steps=1, **COMMON)
    assert run("lcm", args) == 1
    err = _error_lines(capsys)
    assert len(err) == 1, err
    for part in ("could not write checkpoint-2", "the disk is full", "checkpoint-1 is the last complete checkpoint",
                 "--resume_from_checkpoint latest"):
        assert part in err[0], err[0]
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "checkpoint-2").exists() and _leftovers(out) == []  # no half-written checkpoint
    assert not (out / LORA_WEIGHTS_NAME).exists()
    assert ck.load_checkpoint(out / "checkpoint-1", optimizers={}, schedulers={})[0] == 1
    monkeypatch.undo()
    assert run("lcm", args + ["--resume_from_checkpoint", "latest"]) == 0
    assert [r["step"] for r in read_logs(out)] == [1, 2, 3]


def test_disk_full_while_writing_the_output(tiny_sd_path, digits_dir, tmp_path, monkeypatch, capsys):
    """The weights are written, then the recipe's write finds the disk full: no output file is left (a LoRA
    without its recipe would look finished), the last step's checkpoint is, and resuming writes the output."""
    from stepdistill.recipe import Recipe

    out = tmp_path / "run"
    monkeypatch.setattr(Recipe, "save", lambda self, folder, *a, **k: _disk_full(Path(folder) / "stepdistill.json"))
    args = train_args(tiny_sd_path, digits_dir, out, max_train_steps=2, **COMMON)
    assert run("lcm", args) == 1
    err = _error_lines(capsys)
    assert len(err) == 1 and "could not write the output" in err[0] and "the disk is full" in err[0], err
    assert "checkpoint-2 is the last complete checkpoint" in err[0]
    assert not (out / LORA_WEIGHTS_NAME).exists() and not (out / "README.md").exists() and _leftovers(out) == []
    monkeypatch.undo()
    assert run("lcm", args + ["--resume_from_checkpoint", "latest"]) == 0
    assert (out / LORA_WEIGHTS_NAME).is_file() and (out / "stepdistill.json").is_file()
    assert "samples/step-000002.png" in (out / "README.md").read_text()  # the card shows the grid


def test_a_failed_state_write_in_a_sharded_checkpoint_still_meets_the_other_processes(tmp_path, monkeypatch):
    """Under FSDP the main process alone writes state.json after every process wrote its shards. When that write
    fails, the main process must still reach the last barrier (the others wait there) and only then raise, so that
    the trainer's all-process check stops every process together instead of leaving them waiting."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    kwargs = dict(method="lcm", networks={"unet": net}, optimizers={"unet": opt}, schedulers={}, copies={},
                  total_limit=None, is_main=True, num_processes=1)
    barriers = []
    ck.save_sharded_checkpoint(tmp_path / "ok", 1, barrier=lambda: barriers.append("ok"), **kwargs)
    real_write = Path.write_text

    def full_disk_for_state(self, *a, **k):
        if self.name == ck.STATE_NAME:
            _disk_full(self)
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk_for_state)
    with pytest.raises(OSError) as e:
        ck.save_sharded_checkpoint(tmp_path / "full", 1, barrier=lambda: barriers.append("full"), **kwargs)
    assert e.value.errno == errno.ENOSPC
    assert barriers.count("full") == barriers.count("ok") == 3  # every barrier met, as the other processes do
    assert list((tmp_path / "full").iterdir()) == []  # neither checkpoint-1 nor its temporary
