"""``mltk evaluate`` as a library: pick the model and the images, embed them, compute the metrics, write outputs."""

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mltk.data import LabelledImages, drop_unreadable, load_data, merge, readable, select_classes, split_classes, write_skipped
from mltk.embedding import Progress, embed
from mltk.errors import MltkError, UsageError
from mltk.model import MAX_SIDE, EmbeddingModel, Embedder
from mltk.outputs import aside, check_dir, check_replaceable, disk_error, stale_temporaries, temporary
from mltk.rerank import create as create_reranker
from mltk.thresholds import Calibration


def untrained_model(backbone: str, pretrained: bool = False, weights: str | None = None, image_size: int | None = None, device: str | None = None) -> EmbeddingModel:
    """A backbone's own pooled features, no training (experiment config 0)."""
    from mltk.data import data_config

    check_settings(image_size=image_size)
    from mltk.registry import create_backbone

    embedder = Embedder(create_backbone(backbone, pretrained=pretrained, weights=weights, img_size=image_size), dim=None)
    return EmbeddingModel(embedder, data_config(embedder.backbone, image_size), device=device)


def check_settings(batch_size: int = 1, workers: int = 0, max_pairs: int | None = None, image_size: int | None = None) -> None:
    """Numbers that must be in range, checked before any work: one line naming the option."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive number of images, got {batch_size}")
    if workers < 0:
        raise UsageError(f"--workers must be 0 (load in this process) or more processes, got {workers}")
    if max_pairs is not None and max_pairs < 1:
        raise UsageError(f"--max-pairs must be a positive number of pairs, got {max_pairs}")
    if image_size is not None and not 8 <= image_size <= MAX_SIDE:  # what mltk run takes
        raise UsageError(f"--image-size must be a side in pixels from 8 to {MAX_SIDE}, got {image_size}")


def held_out_data(model: EmbeddingModel) -> LabelledImages:
    """The classes a run held out for validation: --val-data, or the --val-classes split."""
    cfg = model.config
    if cfg is None or not (cfg.val_data or cfg.val_classes):
        raise UsageError("this model has no held-out classes to evaluate on; give --data DATA")
    if cfg.val_data:
        data = load_data(cfg.val_data, split="test")  # a benchmark dataset named without a split: its test classes
        return select_classes(data, cfg.val_data_classes) if cfg.val_data_classes else data
    data = load_data(cfg.data)
    if cfg.data_classes:
        data = select_classes(data, cfg.data_classes)
    return split_classes(data, cfg.val_classes, cfg.seed)[1]


@dataclass
class EvalResult:
    values: dict
    roc: object
    embeddings: np.ndarray
    labels: np.ndarray | None
    sources: list
    classes: list[str]
    query_index: np.ndarray | None = None  # rows of ``embeddings`` that were queries, and gallery items (the report's examples)
    gallery_index: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # (path, reason) of unreadable images left out
    embeddings_file: Path | None = None  # where ``embeddings`` were streamed to (a memory map of it)
    left_out: dict = field(default_factory=dict)  # metric name -> why it does not apply to this set (all metrics asked for)
    calibration: Calibration | None = None  # the score thresholds at FAR 1e-1 .. 1e-4 and the EER (when pairs were scored)


def evaluate(
    model: EmbeddingModel,
    data: LabelledImages | None = None,
    pairs_file: str | Path | None = None,
    pairs_root: str | Path | None = None,
    query: LabelledImages | None = None,
    gallery: LabelledImages | None = None,
    metrics: list[str] | None = None,
    batch_size: int = 128,
    workers: int = 2,
    flip_tta: bool = False,
    max_pairs: int | None = None,
    progress: Progress | None = None,
    engine: str = "blocks",
    index_options: dict | None = None,
    embeddings_file: str | Path | None = None,
    rerank: str | None = None,
) -> EvalResult:
    """Embed the images and compute the metrics: on one set (leave-one-out, all pairs), on a pair list, or query vs gallery.

    ``engine`` and ``index_options`` pick the kNN search (``mltk.metrics.Evaluation``); ``rerank``, a re-ranker spec
    (``mltk.rerank.parse_spec``: "k-reciprocal:k1=20"), post-processes its lists for the retrieval metrics. With
    ``embeddings_file`` the embeddings stream to that .npy file and the metrics read it as a
    memory map (rows: the pair list's images, the query then the gallery images, or the set).
    """
    from mltk import metrics as metrics_mod
    from mltk import registry
    from mltk.pairs import check_images, read_pairs

    check_settings(batch_size, workers, max_pairs)
    for name in metrics or []:  # a misspelt metric fails now, not after the embedding
        registry.get("metrics", name)
    if engine not in metrics_mod.ENGINES:  # a misspelt engine fails now too
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(metrics_mod.ENGINES)}")
    reranker = create_reranker(rerank)  # a misspelt re-ranker or parameter fails now too
    options = {"metrics": metrics, "engine": engine, "index_options": index_options, "rerank": reranker}
    if max_pairs is not None:
        options["max_pairs"] = max_pairs
    run_embed = lambda d: embed(model, d, batch_size, workers, flip_tta, progress, embeddings_file)  # noqa: E731
    if pairs_file is not None:
        pair_list = read_pairs(pairs_file, pairs_root)
        check_images(pair_list)  # every named image exists, before anything is embedded
        paths = pair_list.index()[0]
        _, skipped = drop_unreadable(LabelledImages(paths, [0] * len(paths), ["?"], Path(pairs_file).name))
        if skipped:  # pairs naming an unreadable image are left out, the rest are scored
            pair_list = pair_list.without({path for path, _ in skipped})
        paths, first, second = pair_list.index()
        images = LabelledImages(paths, [0] * len(paths), ["?"])
        embeddings = run_embed(images)
        folds = np.asarray(pair_list.folds) if pair_list.folds is not None else None
        same = [s for _, _, s in pair_list.pairs]
        pairs = metrics_mod.Pairs.from_indices(embeddings, first, second, same, folds)
        result = metrics_mod.evaluate_embeddings(embeddings, None, pairs=pairs, **options)
        return EvalResult(
            result.values, result.roc, embeddings, None, paths, [], info={"pair list": str(pairs_file)}, skipped=skipped,
            embeddings_file=embeddings_file, left_out=result.left_out, calibration=calibration(result, model, f"pair list {Path(pairs_file).name}", flip_tta),
        )
    skipped = []
    if query is not None and gallery is not None:
        check_disjoint(query, gallery)
        query, gallery = readable(query, skipped), readable(gallery, skipped)
        both = merge(query, gallery)  # the query images, then the gallery's, labelled over the union of class names
        labels, classes, sources = np.asarray(both.labels), list(both.classes), list(both.sources)
        embeddings = run_embed(both)
        n_q = len(query)
        result = metrics_mod.evaluate_embeddings(embeddings, labels, query=np.arange(n_q), gallery=np.arange(n_q, len(labels)), **options)
        info = {"query images": n_q, "gallery images": len(gallery)}
        source = f"query {query.name} vs gallery {gallery.name}"
    else:
        data = readable(data, skipped)
        embeddings = run_embed(data)
        labels, classes, sources = np.asarray(data.labels), list(data.classes), list(data.sources)
        result = metrics_mod.evaluate_embeddings(embeddings, labels, **options)
        info = {"images": len(data), "classes": len(classes), "protocol": "leave-one-out retrieval, all pairs for verification"}
        source = f"all pairs of {data.name}"
    ev = result.evaluation  # only what the metrics asked for was computed: the report searches its few examples itself
    return EvalResult(
        result.values, result.roc, embeddings, labels, sources, classes, ev.query, ev.gallery, info, skipped, embeddings_file,
        result.left_out, calibration(result, model, source, flip_tta),
    )


def check_disjoint(query: LabelledImages, gallery: LabelledImages) -> None:
    """No query image is also a gallery image, before any is read: a query would find itself first and inflate every
    retrieval metric (In-Shop's protocol, like any, keeps the two apart). Refused, not left out: the numbers then
    come from the sets the user named, or from none."""
    shared = shared_images(query, gallery)
    if not shared:
        return
    first = f"e.g. {str(shared[0])!r}"
    if len(shared) == len(query):
        count = f"every --query image ({len(query)}, {first}) is"
    else:
        count = f"{len(shared)} of the {len(query)} --query images ({first}) {'is' if len(shared) == 1 else 'are'}"
    raise UsageError(
        f"{count} also in --gallery: such a query would find itself first and inflate recall; give a query and a gallery with no image "
        f"in common (a dataset's own query and gallery: --data NAME:ROOT)"
    )


def shared_images(query: LabelledImages, gallery: LabelledImages) -> list:
    """The query images that are gallery images too: the same file (links resolved), cut to the same box if cropped."""
    def key(source) -> tuple:
        return os.path.realpath(source), getattr(source, "box", None)

    in_gallery = {key(s) for s in gallery.sources if isinstance(s, (str, Path))}  # an image in memory has no file
    return [s for s in query.sources if isinstance(s, (str, Path)) and key(s) in in_gallery]


def calibration(result, model: EmbeddingModel, source: str, flip_tta: bool) -> Calibration | None:
    """The operating points of the pairs the metrics scored (None when no pairs were scored, or of one kind only)."""
    from mltk import thresholds

    ev = result.evaluation
    if not ev.pairs_scored:
        return None
    counts = ev.pair_counts()  # already counted: pairs_scored
    positives, negatives = int(counts.positive.sum()), int(counts.negative.sum())
    return thresholds.calibrate(ev.roc(), negatives, positives, model.fingerprint(), source, flip_tta=flip_tta)


def source_name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


OUTPUTS = ("metrics.json", "thresholds.json", "report.html", "embeddings.npy", "labels.npy", "paths.txt", "skipped_images.txt")


def check_out(out: str | Path, inputs: dict | None = None) -> Path:
    """``out`` can take an evaluation: absent, empty, or an earlier evaluation's folder, and none of the command's
    ``inputs`` (``{role: path}``) nor holding one; else one line, before any work (``mltk.outputs.check_replaceable``).

    An earlier evaluation is recognised by its files: a metrics.json and nothing but evaluate's outputs
    (and the hidden temporaries of its writes). It is replaced as a whole; anything else is not mltk's
    to replace.
    """
    out = check_dir(out)
    check_replaceable(out, inputs, mine=_earlier_evaluation, advice="give a new or empty folder")
    return out


def _earlier_evaluation(out: Path) -> str | None:
    """None when ``out`` is absent, empty or an earlier evaluation's folder; else what it holds instead."""
    if not out.is_dir():
        return None
    names = sorted(entry.name for entry in out.iterdir() if not _own_temporary(entry.name))
    foreign = [n for n in names if n not in OUTPUTS]
    if foreign or names and "metrics.json" not in names:
        shown = ", ".join(map(repr, foreign[:3])) + (" ..." if len(foreign) > 3 else "") if foreign else "no metrics.json"
        return f"is not empty and not an earlier evaluation ({shown})"
    return None


def _own_temporary(name: str) -> bool:
    """A hidden ``.NAME.tmp...`` an earlier ``mltk evaluate`` left while writing NAME."""
    return name.startswith(".") and any(name.startswith(f".{output}.tmp") for output in OUTPUTS)


@contextmanager
def output_folder(out: Path):
    """A hidden sibling of ``out`` to write the outputs into, renamed to ``out`` when the block ends.

    An earlier evaluation in ``out`` is replaced as a whole, so the folder always holds the files of
    one evaluation, all of them; if the block fails or is interrupted, the sibling and any folder made
    for it are removed and ``out`` stays as it was. Check ``out`` with ``check_out`` first.
    """
    out = Path(out).resolve()  # a link to a folder: the folder is replaced, the link stays
    for stale in stale_temporaries(out.parent, out.name):  # what a killed evaluation left
        shutil.rmtree(stale, ignore_errors=True)
    made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # the first folder mltk creates
    tmp = temporary(out)
    try:
        _writing(lambda: tmp.mkdir(parents=True), out)
        yield tmp
        check_out(out)  # again: files put into ``out`` while the evaluation ran are the user's, not to be replaced
        _writing(lambda: _swap_in(tmp, out), out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None and made != out:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _writing(step: Callable[[], None], out: Path) -> None:
    """``step()``; an OSError (a full disk, no permission) is one line saying that ``out`` is as it was."""
    try:
        step()
    except OSError as exc:
        raise disk_error(exc, f"the evaluation to {str(out)!r}", "nothing was written") from None


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an earlier ``out`` is moved aside first and removed after."""
    old = aside(out)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def json_value(value):
    """A metric as JSON holds it: numpy numbers as Python's, and a value that is not a finite number (no threshold
    is best: inf; nothing to average: nan) as null, since JSON has no Infinity or NaN and most readers refuse them."""
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return int(value) if isinstance(value, (int, np.integer)) else value


def write_outputs(result: EvalResult, out: Path, save_embeddings: bool, report: str | None = None) -> None:
    """metrics.json, thresholds.json (when pairs were scored), report.html (the ``report`` given), and with ``save_embeddings`` embeddings.npy, labels.npy and
    paths.txt (one per row), and skipped_images.txt: into ``out``, the folder ``output_folder`` gives, which is
    swapped in whole or removed.

    Embeddings already streamed to ``out/embeddings.npy`` (``evaluate(embeddings_file=...)``) stay as they are.
    """
    from mltk import thresholds

    clean = {k: json_value(v) for k, v in result.values.items()}

    def write() -> None:
        (out / "metrics.json").write_text(json.dumps(clean, indent=2, allow_nan=False))
        if result.calibration is not None:
            thresholds.write(result.calibration, out / thresholds.FILE)
        if report is not None:
            (out / "report.html").write_text(report, encoding="utf-8")
        if save_embeddings:
            streamed = result.embeddings_file is not None and Path(result.embeddings_file).resolve() == (out / "embeddings.npy").resolve()
            if not streamed:
                np.save(out / "embeddings.npy", result.embeddings)
            if result.labels is not None:
                np.save(out / "labels.npy", result.labels)
            (out / "paths.txt").write_text("".join(source_name(s) + "\n" for s in result.sources), encoding="utf-8", errors="surrogateescape")
        if result.skipped:
            write_skipped(out / "skipped_images.txt", result.skipped)

    try:
        write()
    except OSError as exc:  # a full disk, say: output_folder removes the partial folder, --out is as it was
        raise disk_error(exc, "the outputs of the evaluation", "--out is as it was") from None


def training_of(run: str | Path) -> tuple[dict, list[dict]] | None:
    """The resolved config and the epoch records of the run directory a model comes from (``run``, or the folder of its
    best.pt / last.pt), for the report; None when it comes from no run directory. A file that is not right: one line."""
    from mltk.run_dir import read_config, read_records, run_of

    folder = run_of(run)
    return (read_config(folder), read_records(folder)) if folder is not None else None


def build_report(result: EvalResult, title: str, max_classes: int = 20, max_points: int = 3000, grid_queries: int = 8, grid_k: int = 6, seed: int = 0, progress: Progress | None = None, training: tuple[dict, list[dict]] | None = None) -> str:
    """The HTML report: metrics, the run's configuration and training curves (``training``: ``training_of(run)``), ROC
    curve, t-SNE and UMAP of a sample of classes, a retrieval grid."""
    from mltk import report
    from mltk.data import open_image

    figures: dict[str, bytes] = {}
    config, records = training or (None, [])
    if records:
        figures["Training curves"] = report.training_curves({title: records})
    auc = result.values.get("roc_auc")
    if result.roc is not None and auc is not None:
        figures["ROC curve"] = report.roc_plot(result.roc.fpr, result.roc.tpr, auc)
    if result.labels is not None and len(result.labels) > 5:
        keep = report.sample_classes(result.labels, max_classes, seed)
        if len(keep) > max_points:
            keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
        shown = f"{len(np.unique(result.labels[keep]))} of {len(np.unique(result.labels))} classes, {len(keep)} images"
        for method, name in (("tsne", "t-SNE"), ("umap", "UMAP")):
            if progress:
                progress(name, 0, 1)
            points = report.project(result.embeddings[keep], method, seed)
            figures[f"{name} ({shown})"] = report.scatter_plot(points, result.labels[keep], result.classes, f"{name} of the embeddings, coloured by class")
            if progress:
                progress(name, 1, 1)
    if result.labels is not None and result.query_index is not None:
        from mltk.metrics import Evaluation

        # A few queries, searched alone: no pass over every query, and k clipped to what a set this size allows.
        ev = Evaluation(result.embeddings, result.labels, query=result.query_index, gallery=result.gallery_index)
        rows, nb = ev.examples(grid_queries, grid_k, seed)
        if len(rows):
            queries = [result.sources[result.query_index[r]] for r in rows]
            neighbours = [[result.sources[i] for i in found] for found in nb.indices]
            figures["Retrieval examples"] = report.retrieval_grid(queries, neighbours, nb.match, open_image)
    metrics = {k: v for k, v in result.values.items() if isinstance(v, float)}
    info = {**result.info, **{k: v for k, v in result.values.items() if not isinstance(v, float)}}
    points = None
    if result.calibration is not None:  # what each threshold gave on these pairs, as mltk index --calibrate would use it
        from mltk.thresholds import describe

        points = {p.name.replace("far=", "FAR "): describe(p, result.calibration.negatives).split(": ", 1)[1] for p in result.calibration.points}
    return report.html_report(title, metrics, info, figures, config, points)
