"""Trainings one after another in one process, for tests/test_kill_resume.py. Usage: kill_worker.py RUNS.json, a
list of [method, [argument, ...], pause] with ``pause`` null or {"after_checkpoint" | "in_save": STEP, "marker":
FILE}: the run writes FILE and then sleeps, right after its checkpoint-STEP is complete ("after_checkpoint") or in
the middle of writing it, between the weights and the optimizer state ("in_save"), so that the test can SIGKILL it
at that exact point. Exits with the first non-zero status."""

import json
import sys
import time
from pathlib import Path

import stepdistill.checkpoint as checkpoint
from stepdistill.api import main
from stepdistill.trainer import Trainer


def _paused(marker: str) -> None:
    Path(marker).write_text("paused")
    time.sleep(3600)  # until the SIGKILL


def install(pause: dict) -> None:
    if "after_checkpoint" in pause:
        save = Trainer._save_checkpoint

        def save_then_pause(self):
            save(self)
            if self.step == pause["after_checkpoint"]:
                _paused(pause["marker"])

        Trainer._save_checkpoint = save_then_pause
    else:
        write = checkpoint.save_file

        def pause_in_save(tensors, path, *args, **kwargs):
            if f".checkpoint-{pause['in_save']}.tmp" in str(path) and Path(path).name.startswith("optimizer"):
                _paused(pause["marker"])
            return write(tensors, path, *args, **kwargs)

        checkpoint.save_file = pause_in_save


if __name__ == "__main__":
    for method, argv, pause in json.loads(Path(sys.argv[1]).read_text()):
        if pause:
            install(pause)
        status = main(method, argv)
        if status:
            sys.exit(status)
