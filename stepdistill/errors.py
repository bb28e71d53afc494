"""One error type for bad input: its message names the input and the fix, on one line."""


class StepdistillError(ValueError):
    """Bad input caught before any expensive work starts. The CLI prints it as one line and exits with 2."""


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
