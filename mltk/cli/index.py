"""``mltk index`` and ``mltk search``: a faiss index of a gallery, its edits (``mltk index add`` / ``remove``), and its
nearest images to query images."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from mltk.cli.options import IMAGES, BatchSize, Calibrate, Device, Far, IndexKind, Rerank, Run, Workers, ef_search_option, nprobe_option, out_option


class BuildByDefault(TyperGroup):
    """``mltk index RUN --data ... --out ...`` builds an index, as it always has; ``mltk index add|remove INDEX ...``
    edits one. Arguments that do not start with a subcommand's name go to ``build``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["build", *args]
        return super().parse_args(ctx, args)


index_app = typer.Typer(
    cls=BuildByDefault, no_args_is_help=True, rich_markup_mode="rich",
    help="Build an index of a gallery (`mltk index RUN --data GALLERY --out DIR`, the same as `mltk index build ...`), "
    "or edit one: `mltk index add INDEX DATA`, `mltk index remove INDEX --class NAME`.",
)


@index_app.command("build")
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


IndexDirArg = Annotated[Path, typer.Argument(help="Index directory written by `mltk index`.")]


@index_app.command("add")
def add(
    index_dir: IndexDirArg,
    data: Annotated[str, typer.Argument(help=f"Images to add: {IMAGES}, matched to the index's classes by name; with --class, or for an index without classes, a folder of images.")],
    class_name: Annotated[Optional[str], typer.Option("--class", help="Every image of DATA belongs to this class (made if the index has none of that name).")] = None,
    unlabelled: Annotated[bool, typer.Option("--unlabelled", help="DATA is a folder of images without classes (every image under it), as `mltk index --unlabelled` reads one.")] = False,
    batch_size: BatchSize = 128,
    workers: Workers = 2,
    device: Device = None,
) -> None:
    """Add images to an index directory without building it again: embedded with the index's model, swapped in whole
    (a kill leaves the index as it was or as it is after), one edit at a time."""
    from rich.markup import escape

    from mltk.cli.output import console, interrupted_means, phases, warn
    from mltk.data import describe_files
    from mltk.display import shown
    from mltk.embedding import EmbedSettings
    from mltk.index import load_gallery
    from mltk.index_edits import add_images, check_class_name

    settings = EmbedSettings(batch_size, workers, device).check()
    if class_name is not None:
        check_class_name(class_name, "--class")
    gallery = load_gallery(data, unlabelled or class_name is not None)
    with interrupted_means(f"the index in {str(index_dir)!r} is as it was"), phases() as progress:
        edit, skipped = add_images(index_dir, gallery, class_name=class_name, settings=settings, progress=progress)
    if skipped:
        warn(f"{len(skipped)} unreadable images were left out: {describe_files(skipped)}")
    into = f" to {'the new ' if edit.new_class else ''}class {edit.class_name!r}" if edit.class_name is not None else ""
    console.print(escape(f"added {edit.added} images{into}: {shown(index_dir)} holds {edit.count} images of {edit.classes} classes"), highlight=False, soft_wrap=True)


@index_app.command("remove")
def remove(
    index_dir: IndexDirArg,
    class_name: Annotated[str, typer.Option("--class", help="The class to remove: every image of it leaves the index, its listing and its labels.")],
) -> None:
    """Remove a class from an index directory: its vectors, paths, labels and uploaded images, in one swap."""
    from rich.markup import escape

    from mltk.cli.output import console
    from mltk.display import shown
    from mltk.index_edits import remove_class

    edit = remove_class(index_dir, class_name)
    console.print(escape(f"removed class {class_name!r} ({edit.removed} images): {shown(index_dir)} holds {edit.count} images of {edit.classes} classes"), highlight=False, soft_wrap=True)


def search(
    index_dir: IndexDirArg,
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

