"""One error type for bad input: its message names the input and the fix, on one line."""


class StepdistillError(ValueError):
    """Bad input caught before any expensive work starts. The CLI prints it as one line and exits with 2."""
