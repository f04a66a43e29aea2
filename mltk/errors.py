"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class MltkError(Exception):
    """A problem with the user's input; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(MltkError):
    """A bad name or option on the command line or in a config file."""

    exit_code = 2
