"""``mltk evaluate``: verification and retrieval metrics, and a report people read."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import BatchSize, Checkpoint, Device, IndexKind, Pretrained, Rerank, Run, Workers, classes_option, data_option, ef_search_option, log_option, logger_names, nprobe_option, out_option


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

    from mltk import evaluate as ev
    from mltk.cli.output import console, interrupted_means, phases, warn
    from mltk.data import describe_files
    from mltk.display import shown
    from mltk.embedding import EmbedSettings
    from mltk.lifecycle import evaluation_ended
    from mltk.report import metric_groups

    request = ev.EvaluateRequest(
        run=run, checkpoint=checkpoint.value if checkpoint is not None else None, backbone=backbone, pretrained=pretrained, weights=weights,
        image_size=image_size, data=data, classes=classes, pairs=pairs, query=query, gallery=gallery, out=out,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else None, max_pairs=max_pairs,
        index=index.value if index is not None else None, nprobe=nprobe, ef_search=ef_search, rerank=rerank, save_embeddings=save_embeddings,
        report=report, log=logger_names(log), embed=EmbedSettings(batch_size, workers, device, flip_tta),
    ).check()  # options and the output folder, before any work: a mistake costs no embedding
    prepared = ev.prepare(request, warn)
    out, model, run_dir, loggers = request.out, prepared.model, prepared.run_dir, prepared.loggers
    kept = f"nothing was written to {str(out)!r} (an earlier evaluation there is as it was)"
    with interrupted_means(kept), phases() as progress:  # written aside, swapped in whole at the end; removed if anything fails
        result = ev.execute(prepared, progress)

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
