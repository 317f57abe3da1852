"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class SdliteError(Exception):
    """A failure while running (exit code 1)."""

    exit_code = 1


class InputError(SdliteError):
    """Bad usage or bad input: a wrong size, a missing file, a corrupt model (exit code 2)."""

    exit_code = 2
