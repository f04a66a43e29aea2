"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class MltkError(Exception):
    """A problem with the user's input; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(MltkError):
    """A bad name or option on the command line or in a config file."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and how to go on. Still a KeyboardInterrupt."""

    exit_code = 130


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS), the CPU allocator's failure or Python's MemoryError; torch is not imported."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def out_of_memory(exc: BaseException, advice: str) -> MltkError:
    """The one-line error for running out of memory: what ran out, then which settings to lower."""
    return MltkError(f"out of memory ({first_line(exc)[:120]}): {advice}")


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's text, for a one-line message; ``default`` (its type's name) where it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__ if default is None else default])[0]
