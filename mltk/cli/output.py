"""What every mltk command prints with: the consoles, warning lines, table cells and the Ctrl-C line.

Strings from users, files and plugins go through ``mltk.display``: data, never markup or escapes.
"""

import os
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

from mltk.display import one_line, shown

console = Console()
err = Console(stderr=True)


def shows_progress() -> bool:
    """Progress bars only for a person at a terminal: not into a file or a pipe, and not in CI (``CI`` set)."""
    return console.is_interactive and not os.environ.get("CI")  # rich's: a terminal that is not TERM=dumb


def cell(text: object) -> Text:
    """A table cell that shows ``text`` as it is: a Text object is never read as rich markup."""
    return Text(shown(text))


def print_wide(renderable) -> None:
    """Print ``renderable`` (a wide table) at its natural width, past the terminal's if need be: squeezed to fit,
    rich would cut its numbers short; a line too long for the terminal wraps or scrolls instead, whole."""
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(1 << 16), renderable).maximum
    if needed <= console.width:
        console.print(renderable)
        return
    wide = Console(file=console.file, width=needed, force_terminal=console.is_terminal, color_system=console.color_system, highlight=False)
    wide.print(renderable, crop=False)


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


@contextmanager
def phases():
    """A transient progress bar, a line per phase, and the callback the library reports to: ``progress(phase, done, total)``.

    It is redrawn on each report, never by a thread of its own: Ctrl-C can land while rich holds its
    lock, and a refresh thread waiting for that lock would hang the exit (rich joins it on the way out).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=True, auto_refresh=False, disable=not shows_progress(),
    )
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total, refresh=True)

    with bar:
        yield progress
