"""``mltk index`` and ``mltk search``: a faiss index of a gallery, and its nearest images to query images."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import BatchSize, Device, IndexKind, Run, Workers, data_option, ef_search_option, nprobe_option, out_option


def index(
    run: Run,
    data: Annotated[str, data_option("Gallery images")],
    out: Annotated[Path, out_option("Index directory to write: new, empty, or an earlier index holding nothing else, which is replaced")],
    kind: Annotated[IndexKind, typer.Option(help="flat: exact; ivf, ivfpq (compressed: pq-m bytes a vector) or hnsw: approximate, for galleries in the millions.")] = IndexKind.flat,
    nlist: Annotated[Optional[int], typer.Option(help="With --kind ivf or ivfpq: k-means cells (default about 4·sqrt(N)).")] = None,
    nprobe: Annotated[Optional[int], nprobe_option("nlist/8, at least 16")] = None,
    pq_m: Annotated[Optional[int], typer.Option(help="With --kind ivfpq: bytes per vector; divides the dimension (default 64 where it does).")] = None,
    m: Annotated[Optional[int], typer.Option("--m", help="With --kind hnsw: graph links per vector (default 32).")] = None,
    ef_search: Annotated[Optional[int], ef_search_option("128")] = None,
    batch_size: BatchSize = 128,
    workers: Workers = 2,
    device: Device = None,
) -> None:
    """Embed a gallery and write a self-contained index directory: index, paths, labels, the model."""
    from rich.markup import escape

    from mltk.cli.output import console, interrupted_means, phases, warn
    from mltk.display import shown
    from mltk.data import describe_files, load_data
    from mltk.errors import UsageError
    from mltk.index import check_request, write_index_dir
    from mltk.model import load

    options = {"nlist": nlist, "nprobe": nprobe, "pq_m": pq_m, "m": m, "ef_search": ef_search}
    given = {k: v for k, v in options.items() if v is not None}
    allowed = {"flat": set(), "ivf": {"nlist", "nprobe"}, "ivfpq": {"nlist", "nprobe", "pq_m"}, "hnsw": {"m", "ef_search"}}[kind.value]
    if set(given) - allowed:
        wrong = ", ".join("--" + k.replace("_", "-") for k in sorted(set(given) - allowed))
        raise UsageError(f"{wrong}: not an option of --kind {kind.value} (ivf: --nlist, --nprobe; ivfpq: those and --pq-m; hnsw: --m, --ef-search)")
    check_request(out, kind.value, batch_size, workers, **given)  # before the model loads: a bad --out costs nothing
    model = load(run, device)
    gallery = load_data(data)
    kept = f"nothing was written to {str(out)!r} (an earlier index there is as it was)"
    with interrupted_means(kept), phases() as progress:
        written, skipped = write_index_dir(model, gallery, out, kind.value, run=str(run.resolve()), batch_size=batch_size, workers=workers, progress=progress, **given)
    if skipped:
        warn(f"{len(skipped)} unreadable images were left out: {describe_files(skipped)} (all in {out / 'skipped_images.txt'})")
    params = ", ".join(f"{k} {v}" for k, v in written.meta["params"].items())
    console.print(f"indexed {written.meta['count']} images ({written.meta['dim']} dimensions): {kind.value} index{f' ({params})' if params else ''}")
    console.print(f"written to [bold]{escape(shown(out))}[/bold]: index.faiss, embeddings.npy, paths.txt, labels.npy, classes.json, model.pt, meta.json")


def search(
    index_dir: Annotated[Path, typer.Argument(help="Index directory written by `mltk index`.")],
    images: Annotated[list[Path], typer.Argument(help="Query image files.")],
    k: Annotated[int, typer.Option(help="Neighbours per query.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts: [{query, neighbours: [{rank, path, label, class, score}]}].")] = False,
    nprobe: Annotated[Optional[int], nprobe_option("the index's")] = None,
    ef_search: Annotated[Optional[int], ef_search_option("the index's")] = None,
    device: Device = None,
) -> None:
    """The gallery images nearest to each query image, with their cosine similarity."""
    from rich.table import Table

    from mltk.cli.output import cell, console
    from mltk.index import search_images

    results = search_images(index_dir, images, k, nprobe=nprobe, ef_search=ef_search, device=device)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for result in results:  # class names and paths come from the index's files: text, never markup
        table = Table("rank", "score", "class", "path", title=cell(result["query"]), title_justify="left", header_style="bold")
        for n in result["neighbours"]:
            table.add_row(str(n["rank"]), f"{n['score']:.4f}", cell(n["class"]), cell(n["path"]))
        console.print(table)

