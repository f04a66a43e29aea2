"""``mltk embed``: the vectors of a folder of images, with their paths, for other programs to read."""

from pathlib import Path
from typing import Annotated

import typer

from mltk.cli.options import BatchSize, Device, Run, Workers, out_option


def embed(
    run: Run,
    data: Annotated[str, typer.Option(help="Images to embed: a folder (every image under it; class folders are not needed), a CSV (path,label) or a dataset name.")],
    out: Annotated[Path, out_option("Folder to write: new, empty, or an earlier `mltk embed` folder holding nothing else, which is replaced")],
    batch_size: BatchSize = 128,
    workers: Workers = 2,
    device: Device = None,
) -> None:
    """Embed images and write the vectors with their paths: embeddings.npy (float32, row i is line i of paths.txt),
    paths.txt (one path a line) and meta.json (the model's fingerprint, the run, the data).

    .npy and text rather than Parquet: numpy reads them with nothing else installed and maps a set larger than memory
    (np.load(..., mmap_mode="r")), and they are the files `mltk index` writes. A folder rather than a file: the
    vectors, their paths and meta.json are replaced together, and meta.json shows that mltk wrote the folder."""
    from rich.markup import escape

    from mltk.cli.output import console, interrupted_means, phases, warn
    from mltk.data import describe_files
    from mltk.display import shown
    from mltk.embed_files import check_request, load_images, write_embeddings
    from mltk.model import load

    check_request(out, batch_size, workers, inputs={"RUN": run, "--data": data})  # before the model loads: a bad --out costs nothing
    model = load(run, device)
    images = load_images(data)
    source = str(Path(data).resolve()) if Path(data).exists() else data
    with interrupted_means(f"nothing was written to {str(out)!r} (an earlier embeddings folder there is as it was)"), phases() as progress:
        written, skipped = write_embeddings(
            model, images, out, run=str(run.resolve()), source=source, batch_size=batch_size, workers=workers, progress=progress,
        )
    if skipped:
        warn(f"{len(skipped)} unreadable images were left out: {describe_files(skipped)} (all in {out / 'skipped_images.txt'})")
    names = "embeddings.npy, paths.txt, meta.json" + (", skipped_images.txt" if skipped else "")
    console.print(f"embedded {written.meta['count']} images ({written.meta['dim']} dimensions) to [bold]{escape(shown(out))}[/bold]: {names}")
