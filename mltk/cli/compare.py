"""``mltk compare``: the experiment table of some runs, on the terminal and as Markdown or an HTML page."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import out_option


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (what mltk run --out wrote).", show_default=False)],
    out: Annotated[Optional[list[Path]], out_option("Also write the table to FILE.md (Markdown) or FILE.html (a page with every run's training curves); repeatable. A file there already is replaced only if mltk compare wrote it")] = None,
) -> None:
    """Compare runs: the settings they differ in, train time, images/s, best epoch, and the metrics of each run's latest evaluation.

    The best value of each column is marked; a run not yet evaluated shows – and the command that fills it. Metrics are
    ranked only between evaluations of the same images, never for one on the run's own training classes.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from mltk import compare as cmp
    from mltk.cli.output import cell, console, interrupted_means, print_wide
    from mltk.display import shown

    outputs = cmp.check_outputs(out or [], runs)  # before anything is read
    table = cmp.compare(runs)
    grid = Table(*(column.name for column in table.columns), header_style="bold", box=box.SIMPLE_HEAD)
    for column, numeric in zip(grid.columns, table.numeric()):
        column.justify = "right" if numeric else "left"
    for r, row in enumerate(table.cells()):
        grid.add_row(*(Text(value, style="bold green") if (r, c) in table.best else cell(value) for c, value in enumerate(row)), style="yellow" if r in table.unranked else None)
    print_wide(grid)  # all of it, even on a narrow terminal
    for text, command in [(cmp.BEST.format(how="in green"), ""), *table.notes]:
        loud = text.startswith(cmp.UNRANKED)  # rows left out of the ranking: said as loudly as the best is marked
        console.print(Text.assemble((text, "yellow" if loud else "dim"), (command, "bold")), soft_wrap=True)
    if outputs:
        with interrupted_means("nothing was written (a file there earlier is as it was)"):
            cmp.write(table, outputs)
        console.print(Text(f"written: {', '.join(shown(path) for path, _ in outputs)}"), soft_wrap=True)
