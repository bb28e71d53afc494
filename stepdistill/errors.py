"""One error type for bad input: its message names the input and the fix, on one line.

Every command (``train_scripts/train_<method>.py``, ``stepdistill ...``, ``eval/*.py``) prints a StepdistillError
as one line on stderr and exits with status 2, without a traceback; ``--debug`` anywhere on its command line also
prints the traceback (for reporting a bug in a check)."""

from __future__ import annotations

import sys
import traceback

DEBUG_FLAG = "--debug"
EXIT_BAD_INPUT = 2


class StepdistillError(ValueError):
    """Bad input caught before any expensive work starts. The CLI prints it as one line and exits with 2."""


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def report(error: StepdistillError, prefix: str = "error: ", debug: bool = False) -> int:
    """Print ``error`` as one line on stderr (after its traceback with ``debug``); return the exit status, 2."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    text = " ".join(str(error).split("\n"))  # one line, whatever the message holds
    print(f"{prefix}{text}", file=sys.stderr)
    return EXIT_BAD_INPUT


class TrainingStopped(RuntimeError):
    """A run stopped before its end by something found while training: a NaN or inf in a loss, a full disk. Its
    message (one line) names the cause, the last complete checkpoint and how to resume; the CLI exits with 1."""

    exit_code = 1


class Preempted(Exception):
    """SIGTERM (a scheduler's notice before pre-emption): the run saved a checkpoint of its current step and stopped
    without writing the final output. Not a failure: the CLI exits with 0; ``checkpoint`` is the path to resume."""

    exit_code = 0

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
