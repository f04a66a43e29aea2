"""``mltk evaluate``: verification and retrieval metrics, and a report people read."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import BatchSize, Checkpoint, Device, IndexKind, Pretrained, Rerank, Run, Workers, classes_option, data_option, ef_search_option, log_option, logger_names, nprobe_option, out_option
from mltk.errors import MltkError, UsageError


def evaluate(
    run: Run = None,
    checkpoint: Checkpoint = None,
    data: Annotated[Optional[str], data_option("Images to evaluate, and the root of --pairs", "the run's held-out classes")] = None,
    classes: Annotated[Optional[list[str]], classes_option("--data (or --query and --gallery)")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="Pair list: LFW pairs.txt or CSV path1,path2,same, resolved against --data.")] = None,
    query: Annotated[Optional[str], typer.Option(help="Query images (with --gallery).")] = None,
    gallery: Annotated[Optional[str], typer.Option(help="Gallery images (with --query).")] = None,
    out: Annotated[Optional[Path], out_option("Output folder: new, empty, or an earlier evaluation, which is replaced whole", "RUN/eval (RUN/eval-best with --checkpoint best), or eval-BACKBONE")] = None,
    batch_size: BatchSize = 128,
    flip_tta: Annotated[bool, typer.Option("--flip-tta", help="Average each embedding with the mirrored image's.")] = False,
    save_embeddings: Annotated[bool, typer.Option("--save-embeddings", help="Write embeddings.npy, labels.npy, paths.txt. The embeddings stream to disk and the metrics read them from there: the way to evaluate a set larger than memory.")] = False,
    metrics: Annotated[Optional[str], typer.Option(help="Comma-separated metric names (default: all; `mltk list metrics`).")] = None,
    max_pairs: Annotated[Optional[int], typer.Option(help="Above this many pairs, score a uniform sample instead of all.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Evaluate an untrained backbone (no RUN): its pooled features.")] = None,
    pretrained: Pretrained = False,
    weights: Annotated[Optional[str], typer.Option(help="With --backbone: a local weights file.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="With --backbone: image side in pixels.")] = None,
    workers: Workers = 2,
    device: Device = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html (plots take a while on big sets).")] = True,
    log: Annotated[Optional[list[str]], log_option("Loggers that get the evaluation's metrics", "the run's own, as its config.yaml names them")] = None,
    index: Annotated[Optional[IndexKind], typer.Option(help="Nearest neighbours from a faiss index: flat (exact), or ivf / ivfpq / hnsw (approximate, for millions of images; their recall against the exact search is measured on 1,000 queries). Default: mltk's exact blockwise pass.")] = None,
    nprobe: Annotated[Optional[int], nprobe_option("nlist/8, at least 16")] = None,
    ef_search: Annotated[Optional[int], ef_search_option("128")] = None,
    rerank: Rerank = None,
) -> None:
    """Evaluate embeddings: ROC-AUC, TAR@FAR, EER, 10-fold accuracy, recall@k, precision@k, MAP@R, report.html, and the
    score thresholds at FAR 1e-1 .. 1e-4 and the EER (thresholds.json, for `mltk index --calibrate`)."""
    from rich.table import Table
    from rich.text import Text

    from mltk.cli.output import console, interrupted_means, phases, warn
    from mltk.display import shown
    from mltk.report import metric_groups

    if (run is None) == (backbone is None):
        raise UsageError("give a RUN directory or checkpoint, or --backbone NAME for an untrained backbone")
    if (query is None) != (gallery is None):
        raise UsageError("--query and --gallery go together")
    if pairs is not None and (data is None or not Path(data).is_dir()):  # not a dataset spec: its paths would be joined to the spec
        given = "" if data is None else f"; {data!r} is {'a file' if Path(data).exists() else 'not a folder'}"
        raise UsageError(f"--pairs needs --data: the folder its image names are relative to{given}")
    if pairs is not None and classes:
        raise UsageError("--classes picks images by class; a --pairs list names its images itself")
    if backbone and not (data or query):
        raise UsageError("--backbone needs --data (or --query and --gallery)")
    if run is None and checkpoint is not None:
        raise UsageError("--checkpoint picks best.pt or last.pt of a RUN directory; an untrained --backbone has none")
    if run is not None and (pretrained or weights is not None or image_size is not None):
        raise UsageError("--pretrained, --weights and --image-size go with --backbone; a run's checkpoint has its own")
    kind = index.value if index is not None else None
    if nprobe is not None and kind not in ("ivf", "ivfpq") or ef_search is not None and kind != "hnsw":
        raise UsageError("--nprobe goes with --index ivf or ivfpq, --ef-search with --index hnsw")
    for option, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be a positive number, got {value}")

    from mltk import evaluate as ev
    from mltk.data import describe_files, load_data, load_test_data, select_classes
    from mltk.lifecycle import evaluation_ended, evaluation_loggers
    from mltk.run_dir import run_of
    from mltk.model import find_checkpoint, inference_device, load
    from mltk.rerank import create as create_reranker

    # Options and the output folder are checked before any work: a mistake costs no embedding.
    ev.check_settings(batch_size, workers, max_pairs, image_size)
    create_reranker(rerank)  # a misspelt re-ranker or parameter costs no embedding
    inference_device(device)
    which = checkpoint.value if checkpoint is not None else None
    scored = find_checkpoint(run, which) if run is not None else None  # last.pt unless told: best.pt was chosen on the held-out classes
    own = "eval-best" if which == "best" else "eval"  # RUN/eval stays the evaluation of what RUN means to index, export and verify
    out = ev.check_out(
        out or (Path(run) / own if run is not None and Path(run).is_dir() else Path(f"eval-{backbone or Path(run).stem}")),
        {"RUN": run, "--data": data, "--pairs": pairs, "--query": query, "--gallery": gallery, "--weights": weights},
    )
    training = None  # the run's config and training curves, for the report
    if run is not None and report:
        try:
            training = ev.training_of(run)
        except MltkError as exc:  # the checkpoint is what is evaluated: a broken config.yaml or metrics.jsonl costs only the report's section
            warn(f"report.html leaves out the run's configuration and training curves: {exc}")
    model = load(scored, device) if run is not None else ev.untrained_model(backbone, pretrained, weights, image_size, device)
    run_dir = run_of(run) if run is not None else None
    loggers = evaluation_loggers(logger_names(log), model.config, run_dir, warn)  # before the work: a missing package costs one line
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    inputs = {}
    if pairs is not None:
        inputs = {"pairs_file": pairs, "pairs_root": data}
    elif query is not None:
        inputs = {"query": load_data(query, "test"), "gallery": load_data(gallery, "test")}  # a dataset: its test split unless named
    else:
        inputs = load_test_data(data) if data else {"data": ev.held_out_data(model)}  # a dataset: its test split (In-Shop: query vs gallery)
    if classes:
        inputs = {key: select_classes(images, classes) for key, images in inputs.items()}
    spec = ev.data_spec(model, data, classes, pairs, query, gallery)
    if backbone is not None:
        spec["backbone"] = backbone

    kept = f"nothing was written to {str(out)!r} (an earlier evaluation there is as it was)"
    with interrupted_means(kept), ev.output_folder(out) as folder, phases() as progress:  # written aside, swapped in whole at the end; removed if anything fails
        options = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        if save_embeddings:  # streamed there while embedding; the metrics read it as a memory map
            inputs["embeddings_file"] = folder / "embeddings.npy"
        result = ev.evaluate(
            model, metrics=names, batch_size=batch_size, workers=workers, flip_tta=flip_tta, max_pairs=max_pairs, progress=progress,
            engine=kind or "blocks", index_options=options, rerank=rerank, spec=spec, **inputs,
        )
        html = ev.build_report(result, f"mltk evaluate — {run if run is not None else backbone}", progress=progress, training=training) if report else None
        ev.write_outputs(result, folder, save_embeddings, html)
        result.embeddings = None  # the memory map of folder/embeddings.npy: closed before the folder moves

    # What was scored, and what a reader of the figures must know (the report and metrics.json say it too).
    if result.provenance.get("checkpoint"):
        epoch = result.provenance["checkpoint_epoch"]
        console.print(Text.assemble("scored ", (shown(result.provenance["checkpoint"]), "bold"), f", epoch {epoch}" if epoch is not None else ""), soft_wrap=True)
    for caution in ev.cautions(result.provenance):
        warn(caution)
    if backbone is not None and not pretrained and weights is None:
        warn(f"--backbone {backbone!r} had neither --pretrained nor --weights: these figures score its random initial weights, not learned features")
    # Every string here may come from a file or a plugin (paths, metric names): data, never rich markup.
    table = Table("metric", header_style="bold")
    table.add_column("value", justify="right")
    for group, rows in metric_groups(result.values).items():  # as report.html shows them, where each is explained
        if table.row_count:
            table.add_section()
        table.add_row(Text(group, style="bold"), "")
        for row in rows:
            table.add_row(Text(row.label), Text(row.value))
    console.print(table)
    if "index_check_queries" in result.values:
        console.print(index_cost(result.values), markup=False, highlight=False)
    reasons: dict[str, list[str]] = {}  # metrics this set cannot give (all were asked for), grouped by why
    for name, why in result.left_out.items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        console.print(Text(f"not computed: {', '.join(names)} ({why})", style="dim"), soft_wrap=True)
    for name, why in result.not_measured.items():  # "–" in the table: a number here would be a guess
        console.print(Text(f"{name}: – ({why})", style="dim"), soft_wrap=True)
    if result.skipped:
        warn(f"{len(result.skipped)} unreadable images were left out: {describe_files(result.skipped)} (all in {out / 'skipped_images.txt'})")
    written = [name for name in ev.OUTPUTS if (out / name).is_file()]
    console.print(Text.assemble("written to ", (shown(out), "bold"), f": {', '.join(written)}"), soft_wrap=True)
    with interrupted_means(f"the evaluation is written to {str(out)!r}; the loggers may hold part of it"):
        evaluation_ended(
            loggers, warn, config=model.config, run_dir=run_dir, out=out,
            metrics={k: ev.json_value(v) for k, v in result.values.items()}, provenance=result.provenance,
        )


def index_cost(values: dict) -> str:
    """One sentence: what the approximate index cost against the exact search, on the checked queries."""
    recalls = {int(k.split("@")[1]): v for k, v in values.items() if k.startswith("index_recall@")}
    k = max(recalls)
    line = (
        f"{values['index']} index: found {recalls[k]:.1%} of the exact {k} nearest neighbours "
        f"(index_recall@{k}) on {values['index_check_queries']} queries checked against the exact search"
    )
    if "index_check_recall@1_exact" in values:
        exact, approx = values["index_check_recall@1_exact"], values["index_check_recall@1_index"]
        line += f"; recall@1 on them {approx:.4f} with the index, {exact:.4f} exact ({approx - exact:+.4f})"
    return line
