"""Errors that reach the user as one clear line (no traceback).

`TokError` is a runtime failure (exit code 1); `TokUsageError` is a usage mistake (exit code 2).
Library code raises these with a message a researcher can act on; the CLI prints `error: <message>`.
"""


class TokError(Exception):
    """A runtime failure the user can act on (bad file, missing weights, ...). CLI exit code 1."""

    exit_code = 1


class TokUsageError(TokError):
    """The command was called wrongly (bad option combination, unknown model name form). CLI exit code 2."""

    exit_code = 2


class MissingWeightsError(TokError):
    """A weight file is needed that is not on this machine; the message names the file and how to get it."""
