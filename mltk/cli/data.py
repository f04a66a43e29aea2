"""``mltk data fetch``: a dataset downloaded and laid out as ``--data`` reads it; for the others, where to get them."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import out_option

data = typer.Typer(help="Datasets: fetch one that a library can download, laid out as --data takes it.", no_args_is_help=True)


@data.command()
def fetch(
    name: Annotated[str, typer.Argument(metavar="NAME", help="omniglot or omniglot-evaluation (torchvision downloads them); att, cub200, cars196, sop or inshop: where to get them.")],
    out: Annotated[Optional[Path], out_option("Folder of <class>/<image> to write: new, empty, or an earlier fetch, which is replaced whole", "./NAME")] = None,
) -> None:
    """Download a dataset and lay it out as <class>/<image>, with fetched.json (its source and terms) beside the classes."""
    from rich.text import Text

    from mltk.cli.output import console
    from mltk.display import shown
    from mltk.fetch import fetch as fetch_dataset

    done = fetch_dataset(name, out)
    console.print(Text(f"{done.name}: {done.classes:,} classes, {done.images:,} images in {shown(done.folder)} (from {done.url})"), soft_wrap=True)
    console.print(Text(f"terms: {done.terms} (kept in {shown(done.folder / 'fetched.json')})"), soft_wrap=True)
