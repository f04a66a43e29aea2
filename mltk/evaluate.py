"""``mltk evaluate`` as a library: pick the model and the images, embed them, compute the metrics, write outputs."""

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mltk.checkpoint import CHECKPOINTS, MAX_SIDE, find_checkpoint
from mltk.data import LabelledImages, drop_unreadable, load_data, merge, readable, select_classes, split_classes, write_skipped
from mltk.embedding import EmbedSettings, Progress, embed
from mltk.errors import MltkError, UsageError
from mltk.model import EmbeddingModel, Embedder, inference_device
from mltk.outputs import check_dir, check_replaceable, disk_error, replace_folder
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
    EmbedSettings(batch_size, workers).check()
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


def check_metrics(names: list[str] | None, engine: str) -> None:
    """The metrics and the kNN engine asked for exist: a misspelt name fails before the embedding."""
    from mltk import metrics as metrics_mod
    from mltk import registry

    for name in names or []:
        registry.get("metrics", name)
    if engine not in metrics_mod.ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(metrics_mod.ENGINES)}")


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
    neighbours: object | None = None  # mltk.metrics.Neighbours the retrieval metrics read: the report's worst queries and classes
    scores: object | None = None  # mltk.report.ScoreHistogram of the scored pairs: the report's genuine and impostor scores
    provenance: dict = field(default_factory=dict)  # what was scored, by which model and checkpoint, when: plain JSON values (``provenance``)
    not_measured: dict = field(default_factory=dict)  # value (None in ``values``) -> why this set cannot measure it: a TAR at too low a FAR


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
    spec: dict | None = None,
) -> EvalResult:
    """Embed the images and compute the metrics: on one set (leave-one-out, all pairs), on a pair list, or query vs gallery.

    ``engine`` and ``index_options`` pick the kNN search (``mltk.metrics.Evaluation``); ``rerank``, a re-ranker spec
    (``mltk.rerank.parse_spec``: "k-reciprocal:k1=20"), post-processes its lists for the retrieval metrics. With
    ``embeddings_file`` the embeddings stream to that .npy file and the metrics read it as a
    memory map (rows: the pair list's images, the query then the gallery images, or the set). ``spec`` is how the
    images were named (``data_spec``), for ``EvalResult.provenance``; by default, the names of the sets given.
    """
    check_settings(batch_size, workers, max_pairs)
    check_metrics(metrics, engine)  # a misspelt metric or engine fails now, not after the embedding
    reranker = create_reranker(rerank)  # a misspelt re-ranker or parameter fails now too
    return embed_and_score(
        model, EmbedSettings(batch_size, workers, flip_tta=flip_tta), reranker, data=data, pairs_file=pairs_file, pairs_root=pairs_root,
        query=query, gallery=gallery, metrics=metrics, max_pairs=max_pairs, progress=progress, engine=engine, index_options=index_options,
        embeddings_file=embeddings_file, spec=spec,
    )


def embed_and_score(
    model: EmbeddingModel, settings: EmbedSettings, reranker, *, data: LabelledImages | None = None, pairs_file: str | Path | None = None,
    pairs_root: str | Path | None = None, query: LabelledImages | None = None, gallery: LabelledImages | None = None,
    metrics: list[str] | None = None, max_pairs: int | None = None, progress: Progress | None = None, engine: str = "blocks",
    index_options: dict | None = None, embeddings_file: str | Path | None = None, spec: dict | None = None,
) -> EvalResult:
    """``evaluate``'s work, on options already checked (``evaluate``, ``EvaluateRequest.check``); ``reranker``: built."""
    from mltk import metrics as metrics_mod
    from mltk.pairs import check_images, read_pairs

    flip_tta = settings.flip_tta
    options = {"metrics": metrics, "engine": engine, "index_options": index_options, "rerank": reranker, "device": str(model.device)}  # the metrics pass runs where the model does
    if max_pairs is not None:
        options["max_pairs"] = max_pairs
    run_embed = lambda d: embed(model, d, settings.batch_size, settings.workers, flip_tta, progress, embeddings_file)  # noqa: E731
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
        keys = image_keys(paths)
        listing = [(keys[a], keys[b], bool(s)) for a, b, s in zip(first, second, same)]
        evaluated = provenance(model, spec or {"pairs": str(pairs_file)}, listing, None, len(paths), flip_tta)
        return EvalResult(
            result.values, result.roc, embeddings, None, paths, [], info={"pair list": str(pairs_file)}, skipped=skipped,
            embeddings_file=embeddings_file, left_out=result.left_out, not_measured=result.not_measured, provenance=evaluated,
            calibration=calibration(result, evaluated, f"pair list {Path(pairs_file).name}", flip_tta),
            **for_report(result),
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
        listing = [("query" if i < n_q else "gallery", key, classes[y]) for i, (key, y) in enumerate(zip(image_keys(sources), labels))]
        spec = spec or {"query": query.name, "gallery": gallery.name}
    else:
        data = readable(data, skipped)
        embeddings = run_embed(data)
        labels, classes, sources = np.asarray(data.labels), list(data.classes), list(data.sources)
        result = metrics_mod.evaluate_embeddings(embeddings, labels, **options)
        info = {"images": len(data), "classes": len(classes), "protocol": "leave-one-out retrieval, all pairs for verification"}
        source = f"all pairs of {data.name}"
        listing = [(key, classes[y]) for key, y in zip(image_keys(sources), labels)]
        spec = spec or {"data": data.name}
    if spec.get("classes_filter"):  # which classes, not only the set they were picked from
        source += f", the {len(classes)} classes matching {', '.join(repr(str(p)) for p in spec['classes_filter'])}"
    evaluated = provenance(model, spec, listing, classes, len(labels), flip_tta)
    ev = result.evaluation  # only what the metrics asked for was computed: the report searches its few examples itself
    return EvalResult(
        result.values, result.roc, embeddings, labels, sources, classes, ev.query, ev.gallery, info, skipped, embeddings_file,
        result.left_out, calibration(result, evaluated, source, flip_tta), provenance=evaluated, not_measured=result.not_measured, **for_report(result),
    )


@dataclass(frozen=True)
class EvaluateRequest:
    """What ``mltk evaluate`` is asked for, as its options name it; ``check`` holds it to them as a whole, before any
    work, and fills in what it resolves (the way ``mltk.config.RunConfig`` is checked once for ``mltk run``)."""

    run: Path | None = None  # a run directory or checkpoint file; or ``backbone``, an untrained one
    checkpoint: str | None = None  # of a run directory: "last" (default) or "best"
    backbone: str | None = None
    pretrained: bool = False
    weights: str | None = None
    image_size: int | None = None
    data: str | None = None  # the images (and the root of ``pairs``); None: the run's held-out classes
    classes: list[str] | None = None
    pairs: Path | None = None
    query: str | None = None
    gallery: str | None = None
    out: Path | None = None  # None: RUN/eval (RUN/eval-best), or eval-BACKBONE
    metrics: list[str] | None = None  # None: all
    max_pairs: int | None = None
    index: str | None = None  # a faiss index kind (``mltk.knn.KINDS``); None: the exact blockwise pass
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: str | None = None  # a re-ranker spec, ``mltk.rerank.parse_spec``
    save_embeddings: bool = False
    report: bool = True
    log: list[str] | None = None  # logger names; None: the run's own, as its config.yaml names them
    embed: EmbedSettings = EmbedSettings()
    # filled in by ``check``:
    scored: Path | None = None  # the checkpoint file evaluated
    reranker: object = None  # ``rerank``, built

    def check(self) -> "EvaluateRequest":
        """The request with ``out``, ``scored`` and ``reranker`` resolved; anything that contradicts itself or is out of
        range is one line, before a model loads or a folder is made."""
        run, backbone, data, pairs = self.run, self.backbone, self.data, self.pairs
        if (run is None) == (backbone is None):
            raise UsageError("give a RUN directory or checkpoint, or --backbone NAME for an untrained backbone")
        if (self.query is None) != (self.gallery is None):
            raise UsageError("--query and --gallery go together")
        if pairs is not None and (data is None or not Path(data).is_dir()):  # not a dataset spec: its paths would be joined to the spec
            given = "" if data is None else f"; {data!r} is {'a file' if Path(data).exists() else 'not a folder'}"
            raise UsageError(f"--pairs needs --data: the folder its image names are relative to{given}")
        if pairs is not None and self.classes:
            raise UsageError("--classes picks images by class; a --pairs list names its images itself")
        if backbone and not (data or self.query):
            raise UsageError("--backbone needs --data (or --query and --gallery)")
        if run is None and self.checkpoint is not None:
            raise UsageError("--checkpoint picks best.pt or last.pt of a RUN directory; an untrained --backbone has none")
        if run is not None and (self.pretrained or self.weights is not None or self.image_size is not None):
            raise UsageError("--pretrained, --weights and --image-size go with --backbone; a run's checkpoint has its own")
        kind = self.index
        if self.nprobe is not None and kind not in ("ivf", "ivfpq") or self.ef_search is not None and kind != "hnsw":
            raise UsageError("--nprobe goes with --index ivf or ivfpq, --ef-search with --index hnsw")
        for option, value in (("--nprobe", self.nprobe), ("--ef-search", self.ef_search)):
            if value is not None and value < 1:
                raise UsageError(f"{option} must be a positive number, got {value}")
        self.embed.check()
        check_settings(max_pairs=self.max_pairs, image_size=self.image_size)
        check_metrics(self.metrics, self.engine)
        reranker = create_reranker(self.rerank)  # a misspelt re-ranker or parameter costs no embedding
        inference_device(self.embed.device)
        scored = find_checkpoint(run, self.checkpoint) if run is not None else None  # last.pt unless told: best.pt was chosen on the held-out classes
        own = "eval-best" if self.checkpoint == "best" else "eval"  # RUN/eval stays the evaluation of what RUN means to index, export and verify
        out = check_out(
            self.out or (Path(run) / own if run is not None and Path(run).is_dir() else Path(f"eval-{backbone or Path(run).stem}")),
            {"RUN": run, "--data": data, "--pairs": pairs, "--query": self.query, "--gallery": self.gallery, "--weights": self.weights},
        )
        return replace(self, out=out, scored=scored, reranker=reranker)

    @property
    def engine(self) -> str:
        return self.index or "blocks"

    @property
    def index_options(self) -> dict:
        return {k: v for k, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search)) if v is not None}


@dataclass
class Prepared:
    """A checked request and what it reads, ready to run: the model, the images, the run's record, the loggers."""

    request: EvaluateRequest
    model: EmbeddingModel
    inputs: dict  # ``evaluate``'s images: data, or query and gallery, or pairs_file and pairs_root
    spec: dict  # how the images were named (``data_spec``)
    run_dir: Path | None  # the run directory the model comes from
    training: tuple[dict, list[dict]] | None  # its config and training curves, for the report
    loggers: list


def prepare(request: EvaluateRequest, warn) -> Prepared:
    """Load what a ``check``ed request evaluates; ``warn(line)`` says what the report will leave out. The loggers come
    first: a missing package costs one line, no embedding."""
    from mltk.data import load_test_data
    from mltk.lifecycle import evaluation_loggers
    from mltk.model import load
    from mltk.run_dir import run_of

    run, backbone, data = request.run, request.backbone, request.data
    training = None
    if run is not None and request.report:
        try:
            training = training_of(run)
        except MltkError as exc:  # the checkpoint is what is evaluated: a broken config.yaml or metrics.jsonl costs only the report's section
            warn(f"report.html leaves out the run's configuration and training curves: {exc}")
    device = request.embed.device
    model = load(request.scored, device) if run is not None else untrained_model(backbone, request.pretrained, request.weights, request.image_size, device)
    run_dir = run_of(run) if run is not None else None
    loggers = evaluation_loggers(request.log, model.config, run_dir, warn)
    if request.pairs is not None:
        inputs = {"pairs_file": request.pairs, "pairs_root": data}
    elif request.query is not None:
        inputs = {"query": load_data(request.query, "test"), "gallery": load_data(request.gallery, "test")}  # a dataset: its test split unless named
    else:
        inputs = load_test_data(data) if data else {"data": held_out_data(model)}  # a dataset: its test split (In-Shop: query vs gallery)
    if request.classes:
        inputs = {key: select_classes(images, request.classes) for key, images in inputs.items()}
    spec = data_spec(model, data, request.classes, request.pairs, request.query, request.gallery)
    if backbone is not None:
        spec["backbone"] = backbone
    return Prepared(request, model, inputs, spec, run_dir, training, loggers)


def execute(prepared: Prepared, progress: Progress | None = None) -> EvalResult:
    """Embed, score and write the outputs into the request's ``out``, swapped in whole (``output_folder``)."""
    request = prepared.request
    with output_folder(request.out) as folder:
        inputs = dict(prepared.inputs)
        if request.save_embeddings:  # streamed there while embedding; the metrics read it as a memory map
            inputs["embeddings_file"] = folder / "embeddings.npy"
        result = embed_and_score(
            prepared.model, request.embed, request.reranker, metrics=request.metrics, max_pairs=request.max_pairs, progress=progress,
            engine=request.engine, index_options=request.index_options, spec=prepared.spec, **inputs,
        )
        title = f"mltk evaluate — {request.run if request.run is not None else request.backbone}"
        html = build_report(result, title, progress=progress, training=prepared.training) if request.report else None
        write_outputs(result, folder, request.save_embeddings, html)
        result.embeddings = None  # the memory map of folder/embeddings.npy: closed before the folder moves
    return result


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


def calibration(result, evaluated: dict, source: str, flip_tta: bool) -> Calibration | None:
    """The operating points of the pairs the metrics scored (None when no pairs were scored, or of one kind only),
    with the ``provenance`` of the evaluation."""
    from mltk import thresholds

    ev = result.evaluation
    if not ev.pairs_scored:
        return None
    counts = ev.pair_counts()  # already counted: pairs_scored
    positives, negatives = int(counts.positive.sum()), int(counts.negative.sum())
    return thresholds.calibrate(ev.roc(), negatives, positives, evaluated["model"], source, flip_tta=flip_tta, evaluated=evaluated)


def for_report(result) -> dict:
    """What the report reads of the metrics' work beyond the values: every query's neighbour list, where the retrieval
    metrics searched, and a histogram of the pair scores, where pairs were scored (a few hundred numbers)."""
    from mltk.metrics import NotApplicable
    from mltk.report import score_histogram

    ev = result.evaluation
    neighbours = None
    if ev.retrieval and ev.labels is not None:
        try:
            neighbours = ev.neighbours()  # the lists the metrics read, not searched again
        except NotApplicable:
            pass
    return {"neighbours": neighbours, "scores": score_histogram(ev.pair_counts()) if ev.pairs_scored else None}


# -- Provenance: what an evaluation scored, with which model and checkpoint, when. metrics.json and thresholds.json
# record it, the report shows it, and mltk compare ranks only evaluations of the same images.


def data_spec(model: EmbeddingModel, data: str | None = None, classes: list[str] | None = None, pairs=None, query: str | None = None, gallery: str | None = None) -> dict:
    """How the command named the evaluated images: its options as given; with no --data or --query, the classes the
    run held out (``held_out_data``)."""
    named = {"data": data, "pairs": pairs, "query": query, "gallery": gallery}
    spec = {key: str(value) for key, value in named.items() if value is not None}
    if not (data or query):
        spec = {"data": held_out_spec(model.config), "held_out": True}
    return {**spec, "classes_filter": list(classes) if classes else None}


def held_out_spec(cfg) -> str:
    """The classes a run held out, in words: its --val-data, or the --val-classes split of its --data."""
    def picked(patterns) -> str:
        return f" (classes {', '.join(repr(str(p)) for p in patterns)})" if patterns else ""

    if cfg.val_data:
        return f"{cfg.val_data}{picked(cfg.val_data_classes)}"
    return f"{cfg.data}{picked(cfg.data_classes)}: the classes --val-classes {cfg.val_classes:g} held out (seed {cfg.seed})"


def image_keys(sources: list) -> list[str]:
    """Each image as a listing names it: its path below the images' common folder (the same listing gives the same
    keys wherever its folder lies), a crop with its box, an image in memory by its position."""
    files = {i: os.path.abspath(s) for i, s in enumerate(sources) if isinstance(s, (str, Path))}
    root = os.path.join(os.path.commonpath([os.path.dirname(f) for f in files.values()]), "") if files else ""  # with its separator
    keys = []
    for i, source in enumerate(sources):
        if i not in files:
            keys.append(f"<{type(source).__name__} {i}>")
            continue
        key = files[i][len(root):].replace(os.sep, "/")  # below root, every one of them: a slice, not relpath (a million images)
        box = getattr(source, "box", None)
        keys.append(f"{key}@{','.join(map(str, box))}" if box else key)
    return keys


def listing_fingerprint(rows: list[tuple]) -> str:
    """A digest of what was scored: the sorted rows (image keys with their class, or the pairs), as JSON."""
    return "sha256:" + hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def provenance(model: EmbeddingModel, spec: dict, rows: list[tuple], classes: list[str] | None, images: int, flip_tta: bool) -> dict:
    """What an evaluation scored (``spec``: ``data_spec``; ``rows``: its listing; ``classes``: None for a pair list),
    with which model and checkpoint, by which mltk, when: ``EvalResult.provenance``, plain JSON values."""
    from mltk import __version__

    record = model.checkpoint or {}
    return {
        **spec,
        "data_fingerprint": listing_fingerprint(rows),
        "classes": len(classes) if classes is not None else None,
        "images": images,
        "model": model.fingerprint(),
        "checkpoint": record.get("path"),
        "checkpoint_epoch": record.get("epoch"),
        "checkpoint_chosen_on_evaluated_classes": chosen_on(model, classes, spec.get("held_out", False)),
        "training_classes_evaluated": training_classes_evaluated(model, classes),
        "flip_tta": flip_tta,
        "mltk_version": __version__,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def chosen_on(model: EmbeddingModel, classes: list[str] | None, held_out: bool) -> bool | None:
    """Whether the checkpoint is a best.pt chosen by validation recall@1 on classes among ``classes`` (those evaluated):
    always when they are the run's ``held_out`` classes, else by name against the run's validation classes. None: it
    is such a best.pt, but its validation classes cannot be listed here (the run's data moved), or a pair list names
    no classes."""
    record = model.checkpoint or {}
    best = record.get("best") or {}
    chosen = Path(record.get("path") or "").name == CHECKPOINTS["best"] and best.get("by") == "val_recall@1" and best.get("epoch") == record.get("epoch")
    if not chosen or held_out:
        return chosen
    if classes is None:
        return None
    try:
        validation = held_out_data(model).classes
    except MltkError:
        return None
    return bool(set(validation) & set(classes))


def training_classes_evaluated(model: EmbeddingModel, classes: list[str] | None) -> int | None:
    """How many evaluated classes the run trained on, by name (the checkpoint's ``classes``: its training classes, after
    its --classes and --val-classes); None for a model of no run, or a pair list, which names no classes. Names are
    all a listing gives: two datasets that both call a class '0' count it as one."""
    if model.classes is None or classes is None:
        return None
    return len(set(model.classes) & set(classes))


def cautions(evaluated: dict) -> list[str]:
    """What a reader of an evaluation's figures must know from its provenance, a sentence each; none when all is well."""
    found = []
    chosen = evaluated.get("checkpoint_chosen_on_evaluated_classes")
    if chosen or chosen is None and evaluated.get("checkpoint"):
        on = "on classes evaluated here" if chosen else "on the run's held-out classes, which cannot be listed here to check against these"
        found.append(
            f"best.pt (epoch {evaluated.get('checkpoint_epoch')}) was chosen by validation recall@1 {on}: its figures flatter it; "
            "last.pt, the default, was chosen on nothing"
        )
    trained = evaluated.get("training_classes_evaluated")
    if trained:
        found.append(
            f"{trained} of the {evaluated.get('classes')} evaluated classes are classes the run trained on (by name): these figures "
            "measure how well it learnt them, not how it does on new classes"
        )
    return found


def source_name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


#: tensorboard/: what ``--log tensorboard`` writes there for a model of no run directory (a run's goes to RUN/tensorboard)
OUTPUTS = ("metrics.json", "thresholds.json", "report.html", "embeddings.npy", "labels.npy", "paths.txt", "skipped_images.txt", "tensorboard")


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


def output_folder(out: Path):
    """A hidden sibling of ``out`` to write the outputs into, renamed to ``out`` when the block ends
    (``outputs.replace_folder``): an earlier evaluation there is replaced as a whole, so the folder always holds the
    files of one evaluation, all of them; if the block fails or is interrupted, ``out`` stays as it was. Check
    ``out`` with ``check_out`` first; it is checked again before the swap (files put there meanwhile are the user's).
    """
    return replace_folder(out, f"the evaluation to {str(out)!r}", "nothing was written", recheck=lambda: check_out(out))


def json_value(value):
    """A metric as JSON holds it: numpy numbers as Python's, and a value that is not a finite number (no threshold
    is best: inf; nothing to average: nan) as null, since JSON has no Infinity or NaN and most readers refuse them."""
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return int(value) if isinstance(value, (int, np.integer)) else value


#: metrics.json: the metrics at the top level, as the first mltk wrote them (every reader of that file reads this one),
#: with this format name, under "not_measured" why a metric that is null was not measured (``EvalResult.not_measured``),
#: and under "evaluated", the provenance (``EvalResult.provenance``)
METRICS_FORMAT = "mltk-metrics-2"


def write_outputs(result: EvalResult, out: Path, save_embeddings: bool, report: str | None = None) -> None:
    """metrics.json (``METRICS_FORMAT``), thresholds.json (when pairs were scored), report.html (the ``report`` given), and with ``save_embeddings`` embeddings.npy, labels.npy and
    paths.txt (one per row), and skipped_images.txt: into ``out``, the folder ``output_folder`` gives, which is
    swapped in whole or removed.

    Embeddings already streamed to ``out/embeddings.npy`` (``evaluate(embeddings_file=...)``) stay as they are.
    """
    from mltk import thresholds

    clean = {"format": METRICS_FORMAT, **{k: json_value(v) for k, v in result.values.items()}, "not_measured": result.not_measured, "evaluated": result.provenance}

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


def build_report(
    result: EvalResult, title: str, max_classes: int = 20, max_points: int = 3000, grid_queries: int = 8, grid_k: int = 6, seed: int = 0,
    progress: Progress | None = None, training: tuple[dict, list[dict]] | None = None, worst: int = 25, class_rows: int = 500,
    projections: tuple[str, ...] = ("tsne", "umap"),
) -> str:
    """The HTML report, to diagnose a model: what was evaluated (and any caution about it), the metrics grouped and
    explained, the operating points; the genuine and impostor scores with those thresholds, the ROC curve; the
    ``worst`` queries (the first ``grid_queries`` with their ``grid_k`` nearest) and every class's recall@1 and MAP@R,
    worst first (the ``class_rows`` worst); the run's training curves (``training``: ``training_of(run)``), the
    ``projections`` (t-SNE, UMAP: the slow part) of a sample of classes; the run's configuration last."""
    from mltk import report
    from mltk.data import open_image

    sections: dict = {}
    points = result.calibration.points if result.calibration is not None else ()
    if result.scores is not None:
        sections["Scores of same-class and different-class pairs"] = report.score_plot(result.scores, points)
    auc = result.values.get("roc_auc")
    if result.roc is not None and auc is not None:
        sections["ROC curve"] = report.roc_plot(result.roc.fpr, result.roc.tpr, auc)
    if result.neighbours is not None:  # every query's list, as the retrieval metrics read it
        args = (result.neighbours, result.labels, result.classes)
        sections["Worst queries"] = report.worst_queries_part(*args, result.sources, result.query_index, open_image, worst, grid_queries, grid_k)
        sections["Classes, worst first"] = report.class_part(*args, result.query_index, class_rows)
    elif result.labels is not None and result.query_index is not None:
        from mltk.metrics import Evaluation

        # No retrieval metric searched: a few random queries, searched alone, k clipped to what a set this size allows.
        ev = Evaluation(result.embeddings, result.labels, query=result.query_index, gallery=result.gallery_index)
        rows, nb = ev.examples(grid_queries, grid_k, seed)
        if len(rows):
            queries = [result.sources[result.query_index[r]] for r in rows]
            neighbours = [[result.sources[i] for i in found] for found in nb.indices]
            sections["Retrieval examples (random queries)"] = report.retrieval_grid(queries, neighbours, nb.match, open_image)
    config, records = training or (None, [])
    if records:
        sections["Training curves"] = report.training_curves({title: records})
    if result.labels is not None and len(result.labels) > 5 and projections:
        keep = report.sample_classes(result.labels, max_classes, seed)
        if len(keep) > max_points:
            keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
        shown = f"{len(np.unique(result.labels[keep]))} of {len(np.unique(result.labels))} classes, {len(keep)} images"
        for method, name in (("tsne", "t-SNE"), ("umap", "UMAP")):
            if method not in projections:
                continue
            if progress:
                progress(name, 0, 1)
            projected = report.project(result.embeddings[keep], method, seed)
            sections[f"{name} ({shown})"] = report.scatter_plot(projected, result.labels[keep], result.classes, f"{name} of the embeddings, coloured by class")
            if progress:
                progress(name, 1, 1)
    described = None
    if result.calibration is not None:  # what each threshold gave on these pairs, as mltk index --calibrate would use it
        from mltk.thresholds import describe

        described = {report.point_label(p.name): describe(p, result.calibration.negatives).split(": ", 1)[1] for p in points}
    return report.html_report(
        title, result.values, result.info, sections, config, described, provenance=result.provenance or None, left_out=result.left_out,
        cautions=cautions(result.provenance), not_measured=result.not_measured,
    )
