"""What every mltk command prints with: the consoles, warning lines, table cells and the Ctrl-C line.

Strings from users, files and plugins go through ``mltk.display``: data, never markup or escapes.
"""

import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

from mltk.display import one_line, shown

console = Console()
err = Console(stderr=True)


def cell(text: object) -> Text:
    """A table cell that shows ``text`` as it is: a Text object is never read as rich markup."""
    return Text(shown(text))


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (above a progress bar, if one is showing)."""
    err.print(f"warning: {one_line(message)}", soft_wrap=True, markup=False, highlight=False)


@contextmanager
def interrupted_means(what: str):
    """Ctrl-C inside: one line saying what became of the output, exit 130 (Typer alone exits 130 silently)."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {one_line(what)}", file=sys.stderr)
        raise typer.Exit(130) from None
