"""``mltk index`` and ``mltk search``: a faiss index of a gallery, and its nearest images to query images."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import IMAGES, BatchSize, Calibrate, Device, Far, IndexKind, Rerank, Run, Workers, ef_search_option, nprobe_option, out_option


def index(
    run: Run,
    data: Annotated[str, typer.Option(help=f"Gallery images: {IMAGES}; or a folder of images without classes, directly in it (or anywhere under it, with --unlabelled).")],
    out: Annotated[Path, out_option("Index directory to write: new, empty, or an earlier index holding nothing else, which is replaced")],
    kind: Annotated[IndexKind, typer.Option(help="flat: exact; ivf, ivfpq (compressed: pq-m bytes a vector) or hnsw: approximate, for galleries in the millions.")] = IndexKind.flat,
    nlist: Annotated[Optional[int], typer.Option(help="With --kind ivf or ivfpq: k-means cells (default about 4·sqrt(N)).")] = None,
    nprobe: Annotated[Optional[int], nprobe_option("nlist/8, at least 16")] = None,
    pq_m: Annotated[Optional[int], typer.Option(help="With --kind ivfpq: bytes per vector; divides the dimension (default 64 where it does).")] = None,
    m: Annotated[Optional[int], typer.Option("--m", help="With --kind hnsw: graph links per vector (default 32).")] = None,
    ef_search: Annotated[Optional[int], ef_search_option("128")] = None,
    unlabelled: Annotated[bool, typer.Option("--unlabelled", help="--data is a folder of images without classes: every image under it is indexed, its subfolders are not classes, and `mltk search` shows no class.")] = False,
    calibrate: Calibrate = None,
    far: Far = None,
    batch_size: BatchSize = 128,
    workers: Workers = 2,
    device: Device = None,
) -> None:
    """Embed a gallery and write a self-contained index directory: index, paths, labels, the model, and with --calibrate
    the threshold below which `mltk search` says "no match". A folder of images without classes is a gallery too."""
    from rich.markup import escape

    from mltk.cli.output import console, interrupted_means, phases, warn
    from mltk.display import shown
    from mltk.data import describe_files
    from mltk.embedding import EmbedSettings
    from mltk.index import IndexRequest, calibration_of
    from mltk.thresholds import describe

    options = {"nlist": nlist, "nprobe": nprobe, "pq_m": pq_m, "m": m, "ef_search": ef_search}
    request = IndexRequest(
        run, data, out, kind.value, {k: v for k, v in options.items() if v is not None}, unlabelled, calibrate, far,
        EmbedSettings(batch_size, workers, device),
    ).check()  # before the model loads: a bad --out costs nothing
    model, gallery = request.load()
    kept = f"nothing was written to {str(out)!r} (an earlier index there is as it was)"
    with interrupted_means(kept), phases() as progress:
        written, skipped = request.write(model, gallery, progress)
    if skipped:
        warn(f"{len(skipped)} unreadable images were left out: {describe_files(skipped)} (all in {out / 'skipped_images.txt'})")
    params = ", ".join(f"{k} {v}" for k, v in written.meta["params"].items())
    classless = "" if written.classes else " without classes"
    console.print(f"indexed {written.meta['count']} images{classless} ({written.meta['dim']} dimensions): {kind.value} index{f' ({params})' if params else ''}")
    calibrated = calibration_of(written.path, written.meta)
    if calibrated is not None:
        calibration, point = calibrated
        console.print(f"match threshold at {describe(point, calibration.negatives)}; calibrated on {calibration.source}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("no match threshold: `mltk search` ranks without saying \"no match\" (add --calibrate RUN/eval)", markup=False, highlight=False)
    console.print(f"written to [bold]{escape(shown(out))}[/bold]: index.faiss, embeddings.npy, paths.txt, labels.npy, classes.json, model.pt, meta.json")


def search(
    index_dir: Annotated[Path, typer.Argument(help="Index directory written by `mltk index`.")],
    images: Annotated[list[Path], typer.Argument(help="Query image files.")],
    k: Annotated[int, typer.Option(help="Neighbours per query.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts: [{query, match, threshold, neighbours: [{rank, path, label, class, score, match}]}]; match is null for an index without a threshold, label and class for a gallery without classes.")] = False,
    far: Far = None,
    rerank: Rerank = None,
    nprobe: Annotated[Optional[int], nprobe_option("the index's")] = None,
    ef_search: Annotated[Optional[int], ef_search_option("the index's")] = None,
    device: Device = None,
) -> None:
    """The gallery images nearest to each query image, with their cosine similarity; "no match" below the index's
    calibrated threshold (`mltk index --calibrate`)."""
    from rich.table import Table

    from mltk.cli.output import cell, console
    from mltk.index import search_images

    results = search_images(index_dir, images, k, nprobe=nprobe, ef_search=ef_search, device=device, far=far, rerank=rerank)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    labelled = any(n["class"] is not None for result in results for n in result["neighbours"])  # else a gallery without classes
    for result in results:  # class names and paths come from the index's files: text, never markup
        calibrated = result["threshold"] is not None
        title = cell(result["query"])
        if calibrated:
            verdict = "match" if result["match"] else "no match"
            title.append(f"  {verdict}", style="bold green" if result["match"] else "bold red")
            title.append(f" (threshold {result['threshold']['score']:.4f}, {result['threshold']['operating_point'].replace('far=', 'FAR ')})", style="dim")
        table = Table("rank", "score", *(["match"] if calibrated else []), *(["class"] if labelled else []), "path", title=title, title_justify="left", header_style="bold")
        for n in result["neighbours"]:
            table.add_row(str(n["rank"]), f"{n['score']:.4f}", *(["yes" if n["match"] else "no"] if calibrated else []), *([cell(n["class"])] if labelled else []), cell(n["path"]))
        console.print(table)

