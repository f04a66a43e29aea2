"""Plots and the self-contained HTML pages of ``mltk evaluate`` and ``mltk compare`` (images inlined as base64 PNGs),
and how people read an evaluation's values (``METRICS``: one label, group and line each, for the page and the terminal).

Class names, paths and every other string from a file are data, never markup: control characters
are shown as escapes (``mltk.display.shown``), HTML is escaped, and matplotlib does not parse them as mathtext
(a class called ``$x$`` is drawn as the four characters it is, and ``$\\foo{$`` does not crash). A page fetches
nothing: its images are inline, and its one script (sorting tables) is allowed by its hash and nothing else is.
"""

import base64
import hashlib
import html
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mltk.display import setting, shown

MISSING = "–"


# ---- How people read an evaluation's values ---------------------------------------------------------------------

#: The groups of an evaluation's values, in the order they are shown, and their headings.
GROUPS = {
    "verification": "Verification: are two images of one class?",
    "retrieval": "Retrieval: what a query finds among the gallery",
    "search": "Nearest-neighbour search",
    "counts": "What was scored",
    "other": "Other values",
}
#: Each value of metrics.json as people read it: (key pattern, group, label, what it says, how it is written: "" by its
#: type (``value_text``), "flag" yes or no, "seconds"). ``{0}`` in the label and the line is the pattern's group (a FAR
#: is written 1e-3).
METRICS = (
    (r"roc_auc", "verification", "ROC-AUC", "chance that a same-class pair scores above a different-class pair (0.5: a coin toss)", ""),
    (r"tar@far=(.+)", "verification", "TAR @ FAR {0}", "same-class pairs accepted at the threshold that accepts {0} of the different-class pairs", ""),
    (r"eer", "verification", "EER", "equal error rate: where false accepts and false rejects are as many (lower is better)", ""),
    (r"eer_threshold", "verification", "EER threshold", "the score (cosine similarity) at the EER", ""),
    (r"balanced_accuracy", "verification", "balanced accuracy", "mean of TAR and TNR at a threshold chosen on the other nine of 10 folds (0.5: chance, whatever the mix of pairs)", ""),
    (r"balanced_accuracy_std", "verification", "balanced accuracy std", "its standard deviation over the folds", ""),
    (r"balanced_accuracy_threshold", "verification", "balanced accuracy threshold", "the mean of the thresholds chosen", ""),
    (r"accuracy", "verification", "accuracy (10-fold)", "pairs judged right at a threshold chosen on the other nine folds (of a list with as many same-class pairs as others)", ""),
    (r"accuracy_std", "verification", "accuracy std", "its standard deviation over the ten folds", ""),
    (r"accuracy_threshold", "verification", "accuracy threshold", "the mean of the ten thresholds chosen", ""),
    (r"recall@(\d+)", "retrieval", "recall@{0}", "queries with an item of their class among their {0} nearest", ""),
    (r"precision@(\d+)", "retrieval", "precision@{0}", "share of a query's {0} nearest that are of its class, on average", ""),
    (r"map@r", "retrieval", "MAP@R", "mean average precision over a query's R nearest, R the gallery items of its class", ""),
    (r"index", "search", "index", "the faiss index searched (approximate); exact search otherwise", ""),
    (r"index_(nlist|nprobe|m|pq_m|ef_search)", "search", "index {0}", "a setting of the index", ""),
    (r"index_check_queries", "search", "queries checked", "queries searched exactly too, to measure what the index missed", ""),
    (r"index_recall@(\d+)", "search", "index recall@{0}", "share of the exact {0} nearest neighbours that the index found", ""),
    (r"index_check_recall@1_exact", "search", "recall@1, exact", "recall@1 of the checked queries, searched exactly", ""),
    (r"index_check_recall@1_index", "search", "recall@1, index", "recall@1 of the checked queries, searched in the index", ""),
    (r"rerank_seconds", "search", "re-ranking time", "seconds the re-ranker took", "seconds"),
    (r"queries", "counts", "queries", "queries scored: those with another item of their class in the gallery", ""),
    (r"queries_excluded", "counts", "queries left out", "queries with no other item of their class in the gallery", ""),
    (r"pairs", "counts", "pairs scored", "pairs whose scores the verification metrics read", ""),
    (r"pairs_positive", "counts", "same-class pairs", "of the pairs scored", ""),
    (r"pairs_total", "counts", "pairs in all", "every pair of the set (more than were scored when a sample was)", ""),
    (r"pairs_sampled", "counts", "pairs sampled", "a uniform random sample of the pairs was scored, not every pair", "flag"),
)
_PATTERNS = [(re.compile(pattern), row) for pattern, *row in METRICS]


@dataclass(frozen=True)
class Shown:
    """One value as people read it."""

    key: str  # as metrics.json names it
    label: str
    value: str
    meaning: str


def metric_groups(values: dict) -> dict[str, list[Shown]]:
    """An evaluation's values by group (``GROUPS``' order, empty groups left out), each in ``METRICS``' order with its
    label, its value as text and one line on what it says; a key no pattern knows (a plugin's metric) under "other"."""
    found = {group: [] for group in GROUPS}
    for key, value in values.items():
        for order, (pattern, (group, label, meaning, kind)) in enumerate(_PATTERNS):
            match = pattern.fullmatch(str(key))
            if match:
                arguments = [_power(a) for a in match.groups()]
                found[group].append((order, Shown(str(key), label.format(*arguments), value_text(value, kind), meaning.format(*arguments))))
                break
        else:
            found["other"].append((len(_PATTERNS), Shown(str(key), shown(key), value_text(value), "")))
    return {group: [item for _, item in sorted(rows, key=lambda row: row[0])] for group, rows in found.items() if rows}


def value_text(value, kind: str = "") -> str:
    """A value as text: a fraction or a score to 4 places, a count with thousands separators, a flag (``kind``) yes or
    no, seconds (``kind``) to 2 places; ``MISSING`` for none or a number that is not finite; a string ``shown``."""
    if value is None or isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return MISSING
    if kind == "flag" or isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return shown(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.2f} s" if kind == "seconds" else f"{value:.4f}"


def _power(text: str) -> str:
    """A rate that is a power of ten as people write it (0.001 as 1e-3); any other text as it is."""
    try:
        rate = float(text)
    except ValueError:
        return text
    exponent = round(math.log10(rate)) if 0 < rate < 1 else 0
    return f"1e{exponent}" if exponent < 0 and math.isclose(rate, 10.0**exponent) else text


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> bytes:
    """The ROC curve, with a log-scaled FAR axis beside the linear one (low FARs matter for verification)."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, log in zip(axes, (False, True)):
        ax.plot(fpr, tpr, lw=1.5, label=f"ROC-AUC {auc:.4f}")
        ax.set_xlabel("false accept rate (FAR)")
        ax.set_ylabel("true accept rate (TAR)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
            lowest = fpr[fpr > 0].min() if (fpr > 0).any() else 1e-5
            ax.set_xlim(max(1e-5, min(lowest, 0.1)), 1)  # a span even when every positive FAR is 1
        else:
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.legend(loc="lower right")
    fig.suptitle("ROC curve")
    return _png(fig)


@dataclass(frozen=True)
class ScoreHistogram:
    """Same-class (genuine) and different-class (impostor) pairs counted in equal bins of score."""

    edges: np.ndarray  # (bins + 1,) scores
    genuine: np.ndarray  # (bins,) pairs
    impostor: np.ndarray


def score_histogram(counts, bins: int = 100) -> ScoreHistogram:
    """``bins`` equal bins over the scores seen, from an evaluation's pair counts (``mltk.metrics.Binned``: pairs per
    score bin and fold; the fine bins are far narrower than these)."""
    genuine, impostor = counts.positive.sum(0), counts.negative.sum(0)
    seen = counts.thresholds[genuine + impostor > 0]
    low, high = float(seen.min()), float(seen.max())
    if high - low < 1e-3:  # one score (a constant model): a narrow span around it
        low, high = low - 0.01, high + 0.01
    edges = np.linspace(low, high, bins + 1)
    count = lambda weights: np.rint(np.histogram(counts.thresholds, edges, weights=weights)[0]).astype(np.int64)  # noqa: E731
    return ScoreHistogram(edges, count(genuine), count(impostor))


def point_label(name: str) -> str:
    """An operating point's name (``far=0.001``, ``eer``) as people write it: FAR 1e-3, EER."""
    return "EER" if name == "eer" else "FAR " + _power(name.removeprefix("far="))


def score_plot(scores: ScoreHistogram, points: Sequence = ()) -> bytes:
    """The genuine and impostor score histograms: each kind's share of its pairs (left) and the pairs on a log scale
    (right: the impostor tail that sets a low FAR's threshold), the thresholds of the operating ``points``
    (``mltk.thresholds.OperatingPoint``) marked on both."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    kinds = ((scores.impostor, "#d73027", "different class"), (scores.genuine, "#1a9850", "same class"))
    marked = [p for p in points if p.threshold is not None and scores.edges[0] <= p.threshold <= scores.edges[-1]]
    colours = plt.get_cmap("tab10")
    for ax, log in zip(axes, (False, True)):
        for counts, colour, name in kinds:
            label = f"{name} ({int(counts.sum()):,} pairs)"
            if log:
                ax.stairs(np.where(counts > 0, counts, np.nan), scores.edges, color=colour, lw=1.2, label=label)
            else:
                ax.stairs(counts / max(int(counts.sum()), 1), scores.edges, fill=True, alpha=0.45, color=colour, label=label)
        for i, point in enumerate(marked):
            ax.axvline(point.threshold, color=colours(i % 10), ls="--", lw=1, label=f"{point_label(point.name)}: {point.threshold:.3f}")
        ax.set_xlabel("score (cosine similarity)")
        ax.set_ylabel("pairs (log scale)" if log else "share of its pairs")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("pair scores: same class against different class, with the operating points' thresholds", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def study_figures(study) -> dict[str, bytes]:
    """An Optuna study's views, drawn by Optuna's own matplotlib plots: the optimisation history, the parameters'
    importances and a slice plot (each left out while the study has too few finished trials to draw it)."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as views

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    wanted = [("Optimisation history", views.plot_optimization_history, 1)]
    if done and done[0].params:
        wanted += [("Parameter importances (fANOVA)", views.plot_param_importances, 2), ("Slice: each setting against the objective", views.plot_slice, 1)]
    _figure()
    figures = {}
    for title, plot, needed in wanted:
        if len(done) < needed:
            continue
        with warnings.catch_warnings():  # Optuna marks its matplotlib views experimental, on every call
            warnings.simplefilter("ignore")
            try:
                drawn = plot(study)
            except (ValueError, RuntimeError):  # e.g. importances of settings that never varied
                continue
        axes = drawn.flatten()[0] if isinstance(drawn, np.ndarray) else drawn
        figures[title] = _png(axes.figure)
    return figures


def sample_classes(labels: np.ndarray, max_classes: int, seed: int = 0) -> np.ndarray:
    """Indices of the items of at most ``max_classes`` classes (a random sample when there are more)."""
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = np.random.default_rng(seed).choice(classes, max_classes, replace=False)
    return np.flatnonzero(np.isin(labels, classes))


def project(embeddings: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates by t-SNE (scikit-learn) or UMAP (umap-learn), cosine metric."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(embeddings) - 1) // 3)))
        return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed).fit_transform(embeddings)
    if method == "umap":
        import warnings

        umap = _umap()
        neighbours = int(min(15, max(2, len(embeddings) - 1)))
        with warnings.catch_warnings():  # its notes that a seed means one thread, and that given neighbours allow no transform of new data
            warnings.filterwarnings("ignore", message=r"n_jobs value .* overridden")
            warnings.filterwarnings("ignore", message=r"precomputed_knn")
            found = cosine_neighbours(embeddings, neighbours)
            return umap.UMAP(n_components=2, metric="cosine", n_neighbors=neighbours, random_state=seed, precomputed_knn=found).fit_transform(embeddings)
    raise ValueError(f"unknown projection {method!r}")


def cosine_neighbours(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Each point's ``k`` nearest by cosine distance, itself first (distance 0): umap-learn's ``precomputed_knn``.

    Exact, from one matrix product: a report's sample is at most a few thousand points. Given this, UMAP skips its own
    nearest-neighbour search and the numba compile that search costs in every new process (about half its time)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similar = unit @ unit.T
    np.fill_diagonal(similar, np.inf)  # itself first, even beside a duplicate
    order = np.argsort(-similar, axis=1, kind="stable")[:, :k]
    distances = 1.0 - np.take_along_axis(similar, order, axis=1)
    distances[:, 0] = 0.0
    return order.astype(np.int32), np.maximum(distances, 0.0).astype(np.float32), None


def _umap():
    """umap-learn, with numba's on-disk cache on for its compiled functions.

    umap-learn declares them without ``cache=True``, so each new process compiles them again: 6 to 15 s of every
    ``mltk evaluate`` on a 2-core machine, for a second of work. ``enable_caching`` is what ``cache=True`` does: the
    compiled code is kept where numba keeps its cache (beside umap-learn, or NUMBA_CACHE_DIR) and reused while
    umap-learn's source is unchanged."""
    import umap
    import umap.layouts
    import umap.umap_
    import umap.utils
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    for module in (umap.umap_, umap.layouts, umap.utils):
        for function in vars(module).values():
            if isinstance(function, Dispatcher) and isinstance(getattr(function, "_cache", None), NullCache):
                try:
                    function.enable_caching()
                except RuntimeError:  # numba found no folder it may write: compiled each time, as before
                    return umap
    return umap


def scatter_plot(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 6))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab20" if len(classes) <= 20 else "hsv", len(classes))
    for i, c in enumerate(classes):
        mine = labels == c
        ax.scatter(points[mine, 0], points[mine, 1], s=10, color=cmap(i), label=shown(class_names[c]) if c < len(class_names) else str(c))
    if len(classes) <= 20:
        legend = ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
        for text in legend.get_texts():  # class names are text, not mathtext
            text.set_parse_math(False)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def retrieval_grid(queries: list, neighbours: list[list], correct: np.ndarray, open_image, captions: list[list[str]] | None = None, row_labels: list[str] | None = None) -> bytes:
    """Each row: a query, then its top-k; green frame = same class, red = another class. ``captions``: a line or two
    over each image, the query's first (class names, scores: drawn as text, never mathtext); ``row_labels``: beside each row."""
    plt = _figure()
    rows, k = len(queries), len(neighbours[0]) if neighbours else 0
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), (1.6 if captions else 1.3) * rows + 0.4), squeeze=False, layout="constrained")
    for r in range(rows):
        for c in range(k + 1):
            ax = axes[r][c]
            source = queries[r] if c == 0 else neighbours[r][c - 1]
            ax.imshow(np.asarray(open_image(source, "RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "black" if c == 0 else ("#1a9850" if correct[r][c - 1] else "#d73027")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if c else 1)
            if captions:
                ax.set_title(captions[r][c], fontsize=6, color=colour, parse_math=False)
        axes[r][0].set_ylabel(row_labels[r] if row_labels else "query", fontsize=7, parse_math=False)
    fig.suptitle("retrieval: query, then its nearest neighbours (green: same class, red: other)", fontsize=9)
    return _png(fig)


def training_curves(histories: dict[str, list[dict]]) -> bytes:
    """Training loss and validation recall@1 against epoch: one line per run (``name -> metrics.jsonl records``), overlaid."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("loss", "training loss", "no epoch finished"), ("val_recall@1", "validation recall@1", "no validation data"))
    colours = plt.get_cmap("tab10")
    for i, (name, records) in enumerate(histories.items()):
        style = dict(color=colours(i % 10), linestyle=("-", "--", ":", "-.")[i // 10 % 4], label=shown(name))
        for ax, (key, _, _) in zip(axes, panels):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3, **style)
    for ax, (_, label, empty) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, empty, ha="center", va="center", color="grey", transform=ax.transAxes)
    losses = [y for line in axes[0].lines for y in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) > 30 * min(losses):  # losses of different kinds, tens apart: each stays readable
        axes[0].set_yscale("log")
    recalls = [y for line in axes[1].lines for y in line.get_ydata()]
    if recalls:  # a share: never drawn past 0 or 1
        margin = 0.1 * (max(recalls) - min(recalls) or 1)
        axes[1].set_ylim(max(0.0, min(recalls) - margin), min(1.0, max(recalls) + margin) + 0.01)
    if len(histories) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        legend = fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)), frameon=False)
        for text in legend.get_texts():  # run names are text, not mathtext
            text.set_parse_math(False)
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True)
class Part:
    """A section of a page made by this module: HTML whose strings are already escaped."""

    html: str


# ---- Which queries and classes fail ------------------------------------------------------------------------------


def first_hits(nb) -> np.ndarray:
    """Each query's rank of its first neighbour of its class (1: the nearest; ``mltk.metrics.Neighbours``), 0 when its
    list holds none."""
    return np.where(nb.match.any(1), nb.match.argmax(1) + 1, 0)


def top_wrong(nb, rows: np.ndarray) -> np.ndarray:
    """Of the queries at ``rows``, the position in its list of the first neighbour of another class (its best-ranked,
    so highest-scoring, wrong hit), -1 when every neighbour listed is of its class."""
    wrong = ~nb.match[rows]
    return np.where(wrong.any(1), wrong.argmax(1), -1)


def worst_queries(nb, count: int) -> np.ndarray:
    """The rows of the ``count`` worst scored queries (those with another item of their class in the gallery), worst
    first: no neighbour of their class in the list, then the lowest-ranked first correct hit; among equals, the
    highest-scoring wrong hit first."""
    rows = np.flatnonzero(nb.included)
    first = first_hits(nb)[rows]
    rank = np.where(first == 0, nb.match.shape[1] + 1, first)
    at = top_wrong(nb, rows)
    wrong = np.where(at >= 0, nb.similarities[rows, np.maximum(at, 0)], -np.inf)
    return rows[np.lexsort((-wrong, -rank))[:count]]


def per_class(nb, query_labels: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, ...]:
    """(class, queries, recall@1, MAP@R) of each class that has scored queries (``query_labels``: each query's class),
    worst first (the lowest recall@1, then MAP@R): the figures ``mltk.metrics`` averages over all queries."""
    from mltk.metrics import average_precision_at_r

    rows = np.flatnonzero(nb.included)
    ap = np.concatenate([np.zeros(0)] + [average_precision_at_r(nb.match[rows[s : s + chunk]], nb.relevant[rows[s : s + chunk]]) for s in range(0, len(rows), chunk)])
    classes, where, queries = np.unique(query_labels[rows], return_inverse=True, return_counts=True)
    recall = np.bincount(where, weights=nb.match[rows, 0], minlength=len(classes)) / queries
    map_r = np.bincount(where, weights=ap, minlength=len(classes)) / queries
    order = np.lexsort((map_r, recall))
    return classes[order], queries[order], recall[order], map_r[order]


def _name(classes: Sequence[str], label: int, limit: int | None = None) -> str:
    name = shown(classes[label]) if 0 <= label < len(classes) else str(label)
    return name if limit is None or len(name) <= limit else name[: limit - 1] + "…"


def worst_queries_part(nb, labels: np.ndarray, classes: Sequence[str], sources: Sequence, query_index: np.ndarray, open_image, count: int = 25, grid: int = 8, k: int = 6) -> Part:
    """The worst queries: a grid of the first ``grid`` with their ``k`` nearest (class and score over each image), and a
    table of the first ``count``: the query, its class, the rank and score of its first correct hit, and its
    highest-scoring wrong hit."""
    rows = worst_queries(nb, count)
    if not len(rows):
        return Part('<p class="notes">No query has another item of its class in the gallery.</p>')
    first, at = first_hits(nb)[rows], top_wrong(nb, rows)
    kept = nb.match.shape[1]
    names = _source_names(sources)
    hit = lambda i: (f"{first[i]}", float(first[i])) if first[i] else (f"none in {kept}", kept + 1.0)  # noqa: E731
    table = [
        [
            names[query_index[r]], _name(classes, labels[query_index[r]]), hit(i),
            (f"{nb.similarities[r, first[i] - 1]:.4f}", float(nb.similarities[r, first[i] - 1])) if first[i] else (MISSING, None),
            _name(classes, labels[nb.indices[r, at[i]]]) if at[i] >= 0 else MISSING,
            (f"{nb.similarities[r, at[i]]:.4f}", float(nb.similarities[r, at[i]])) if at[i] >= 0 else (MISSING, None),
        ]
        for i, r in enumerate(rows)
    ]
    shown_rows = rows[:grid]
    k = min(k, kept)
    captions = [
        [f"query\n{_name(classes, labels[query_index[r]], 16)}"]
        + [f"{nb.similarities[r, j]:.4f}\n{_name(classes, labels[nb.indices[r, j]], 16)}" for j in range(k)]
        for r in shown_rows
    ]
    row_labels = [f"first hit: {first[i]}" if first[i] else f"no hit in {kept}" for i in range(len(shown_rows))]
    png = retrieval_grid(
        [sources[query_index[r]] for r in shown_rows], [[sources[j] for j in nb.indices[r, :k]] for r in shown_rows],
        nb.match[shown_rows, :k], open_image, captions, row_labels,
    )
    header = ["query", "class", "first correct hit (rank)", "its score", "highest-scoring wrong hit (class)", "its score"]
    note = (
        f"The {len(rows)} worst of {int(nb.included.sum()):,} queries: no item of their class among their {kept} nearest first, then the latest "
        "first correct hit; among equals, the highest-scoring wrong hit first. Queries with no other item of their class in the gallery are left out."
    )
    return Part(f'<p class="notes">{_text(note)}</p>{_img(png, "the worst queries and their nearest neighbours")}'
                + _table(header, table, [False, False, True, True, False, True], css="sortable queries"))


def class_part(nb, labels: np.ndarray, classes: Sequence[str], query_index: np.ndarray, limit: int = 500) -> Part:
    """Recall@1 and MAP@R of each class, worst first, in a sortable table (the ``limit`` worst of more)."""
    found, queries, recall, map_r = per_class(nb, labels[query_index])
    rows = [
        [_name(classes, c), (f"{q:,}", float(q)), (f"{r:.4f}", float(r)), (f"{m:.4f}", float(m))]
        for c, q, r, m in zip(found[:limit], queries[:limit], recall[:limit], map_r[:limit])
    ]
    shown_ = f"the {limit:,} worst of {len(found):,} classes" if len(found) > limit else f"all {len(found):,} classes"
    note = f"Recall@1 and MAP@R over each class's queries, {shown_}, worst first; click a column to sort by it."
    return Part(f'<p class="notes">{_text(note)}</p><div class="box">' + _table(["class", "queries", "recall@1", "MAP@R"], rows, [False, True, True, True], css="sortable") + "</div>")


def _source_names(sources: Sequence) -> list[str]:
    """Each image as people find it: its path under the folder all the files share, or ``image N`` for one in memory."""
    paths = [str(s) for s in sources if isinstance(s, (str, os.PathLike))]
    try:
        root = os.path.commonpath(paths) if len(paths) > 1 else ""
    except ValueError:  # relative and absolute paths mixed
        root = ""
    if root and len(paths) == len(sources) and all(p != root for p in paths):
        return [os.path.relpath(str(s), root) for s in sources]
    return [str(s) if isinstance(s, (str, os.PathLike)) else f"image {i}" for i, s in enumerate(sources)]


# ---- HTML ----------------------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A user's or a file's string as HTML text: control characters shown as escapes, markup escaped."""
    return html.escape(shown(value))


def _breakable(value: object) -> str:
    """``_text``, with a line-break opportunity after each _ / = @ + * (a long header or name wraps there, not at a letter)."""
    return re.sub(r"([_/=@+*])", r"\1<wbr>", _text(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _sections(sections: dict) -> str:
    """Each section under its heading: a PNG (bytes) as an image, or a ``Part``."""
    return "".join(f"<section><h2>{_text(name)}</h2>{body.html if isinstance(body, Part) else _img(body, name)}</section>" for name, body in sections.items())


def _pairs(values: dict, kind: str = "pairs") -> str:
    """A two-column table: each name and its value (a float to 4 places); ``kind`` its class (``settings``: left-aligned text)."""
    rows = "".join(f"<tr><td>{_text(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else f"<tr><td>{_text(k)}</td><td>{_text(v)}</td></tr>" for k, v in values.items())
    return f'<table class="{kind}">{rows}</table>'


def _table(header: list[str], rows: list[list], numeric: list[bool], best: set[tuple[int, int]] = frozenset(), css: str = "sortable") -> str:
    """A table whose columns sort on a click (``css`` holding ``sortable``). A cell is its text, or (text, number) where
    the number is what a numeric column sorts by (None: missing, always last; a text alone: the number it reads as); the
    cells at ``best`` (row, column) are marked."""
    def cell(tag: str, r: int, c: int, value) -> str:
        text, key = value if isinstance(value, tuple) else (value, None)
        classes = " ".join(name for name, on in (("number", numeric[c]), ("best", (r, c) in best)) if on)
        attributes = f' class="{classes}"' if classes else ""
        if tag == "td" and numeric[c] and isinstance(value, tuple):
            attributes += f' data-sort="{"" if key is None or not math.isfinite(key) else repr(float(key))}"'
        return f"<{tag}{attributes}>{_breakable(text) if tag == 'th' or not numeric[c] else _text(text)}</{tag}>"

    head = "".join(cell("th", -1, c, name) for c, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", r, c, value) for c, value in enumerate(row)) + "</tr>" for r, row in enumerate(rows))
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# Sorts every table.sortable by the column whose header is clicked (or Enter / Space on it): numbers by their data-sort
# value, highest first on the first click; text in natural order (class_2 before class_10); a missing value always last.
# A module: strict, its names its own, run once the page is parsed.
_SORT = """for (const table of document.querySelectorAll("table.sortable")) {
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((th, column) => {
    const numeric = th.classList.contains("number");
    const key = row => {
      const cell = row.cells[column];
      if (!numeric) return cell.textContent;
      const value = parseFloat(cell.dataset.sort ?? cell.textContent);
      return Number.isNaN(value) ? null : value;
    };
    const sort = () => {
      const current = th.getAttribute("aria-sort");
      const descending = current ? current === "ascending" : numeric;
      heads.forEach(other => other.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      const rows = Array.from(table.tBodies[0].rows, row => [key(row), row]);
      const order = (a, b) => (numeric ? a - b : a.localeCompare(b, undefined, {numeric: true})) * (descending ? -1 : 1);
      rows.sort(([a], [b]) => (a === null) - (b === null) || (a === null ? 0 : order(a, b)));
      table.tBodies[0].append(...rows.map(([, row]) => row));
    };
    th.tabIndex = 0;
    th.title = "sort by this column";
    th.addEventListener("click", sort);
    th.addEventListener("keydown", event => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
    });
  });
}"""
_SORT_HASH = base64.b64encode(hashlib.sha256(_SORT.encode()).digest()).decode()


def _page(title: str, body: str, generator: str = "mltk", width: int | None = 1100) -> str:
    """One self-contained HTML page in mltk's reports' style, at most ``width`` pixels wide (None: the window's width);
    ``generator`` names what wrote it (in a meta tag). Its policy lets it load nothing and run only its own script."""
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SORT_HASH}'"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{html.escape(generator)}">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_text(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: {f"{width}px" if width else "none"}; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 3px 14px 3px 0; vertical-align: top; }}
th {{ text-align: left; border-bottom: 2px solid #999; vertical-align: bottom; }}
td {{ overflow-wrap: break-word; }}
.settings td, .queries td {{ overflow-wrap: anywhere; }}
table.sortable th {{ cursor: pointer; user-select: none; }}
table.sortable th:hover {{ color: #0b5cad; }}
th[aria-sort="ascending"]::after {{ content: " \\25B2"; font-size: 0.7em; }}
th[aria-sort="descending"]::after {{ content: " \\25BC"; font-size: 0.7em; }}
.wide {{ overflow: auto; max-width: 100%; }}
.box {{ overflow: auto; max-height: 32em; margin-bottom: 1.5em; }}
.box table {{ margin-bottom: 0; }}
.box thead th {{ position: sticky; top: 0; background: #fff; }}
.runs {{ font-size: 0.92em; }}
.runs th, .runs td {{ padding-right: 10px; }}
.runs td:not(.number) {{ max-width: 16em; }}
.runs td:first-child, .runs th:first-child {{ position: sticky; left: 0; background: #fff; z-index: 1; }}
.pairs td:nth-child(2), td.number {{ font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }}
th.number {{ text-align: right; }}
td.best {{ font-weight: bold; color: #1a7f37; }}
.metrics {{ width: 100%; }}
.metrics td:first-child {{ white-space: nowrap; width: 13em; }}
.metrics td:nth-child(2) {{ width: 5em; }}
.settings td:first-child {{ white-space: nowrap; }}
.metrics td:last-child, .notes {{ color: #555; }}
.metrics td:nth-child(2) {{ font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }}
.queries td:first-child {{ max-width: 22em; }}
details summary h2 {{ display: inline; }}
.lead {{ font-size: 1.1em; }}
.caution {{ background: #fff4e5; border-left: 4px solid #e08600; padding: 0.5em 0.8em; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{_text(title)}</h1>
{body}
<script type="module">{_SORT}</script>
</body></html>
"""


def html_report(
    title: str, metrics: dict, info: dict, sections: dict, config: dict | None = None, operating_points: dict[str, str] | None = None,
    provenance: dict | None = None, left_out: dict[str, str] | None = None, cautions: Sequence[str] = (), not_measured: dict[str, str] | None = None,
) -> str:
    """One self-contained HTML page: what was evaluated (``provenance`` with the rest of ``info``; its data and
    checkpoint in the first line) and the ``cautions`` about it; the ``metrics`` grouped and explained
    (``metric_groups``; a value ``not_measured`` with why), with what was ``left_out`` and why; the score thresholds (``operating_points``: name -> what
    it gives); the ``sections`` (name -> a PNG or a ``Part``); the run's ``config`` last, folded."""
    provenance = provenance or {}
    evaluated = {**provenance, **{k: v for k, v in info.items() if k not in provenance}}
    parts = [_lead(provenance)]
    parts += [f'<p class="caution">{_text(caution)}</p>' for caution in cautions]
    if evaluated:  # the lead says the most of it: the rest, folded
        shown_ = {str(k).replace("_", " "): v if isinstance(v, float) else setting(v) for k, v in evaluated.items()}
        parts.append(f"<details><summary><h2>Evaluated</h2> ({len(shown_)} entries)</summary>{_pairs(shown_, 'settings')}</details>")
    for group, rows in metric_groups(metrics).items():
        body = "".join(
            f'<tr><td title="metrics.json: {_text(row.key)}">{_text(row.label)}</td><td>{_text(row.value)}</td>'
            f'<td>{_text(row.meaning)}{_text(f" (not measured: {why})") if (why := (not_measured or {}).get(row.key)) else ""}</td></tr>'
            for row in rows
        )
        parts.append(f'<h2>{_text(GROUPS[group])}</h2><table class="metrics">{body}</table>')
    reasons: dict[str, list[str]] = {}
    for name, why in (left_out or {}).items():
        reasons.setdefault(why, []).append(name)
    parts += [f'<p class="notes">Not computed: {_text(", ".join(names))} ({_text(why)}).</p>' for why, names in reasons.items()]
    if operating_points:
        parts.append(f"<h2>Operating points (thresholds.json)</h2>{_pairs(operating_points, 'settings')}")
    parts.append(_sections(sections))
    if config:
        parts.append(f"<details><summary><h2>Configuration</h2> ({len(config)} settings of the run)</summary>{_pairs({k: setting(v) for k, v in config.items()}, 'settings')}</details>")
    return _page(title, "\n".join(part for part in parts if part))


def _lead(provenance: dict) -> str:
    """The first lines of a report: the data evaluated and the checkpoint scored (or the untrained backbone), where the
    provenance names them."""
    named = ", ".join(setting(provenance[key]) if key == "data" else f"{key} {setting(provenance[key])}" for key in ("data", "query", "gallery", "pairs") if provenance.get(key) is not None)
    counts = ", ".join(f"{provenance[key]:,} {key}" for key in ("classes", "images") if isinstance(provenance.get(key), int))
    epoch = provenance.get("checkpoint_epoch")
    if provenance.get("checkpoint"):
        scored = f"checkpoint {setting(provenance['checkpoint'])}" + (f", epoch {setting(epoch)}" if epoch is not None else "")
    else:
        scored = f"backbone {setting(provenance['backbone'])}, untrained" if provenance.get("backbone") else ""
    lines = [f"{label}: {text}" for label, text in (("Data", "; ".join(part for part in (named, counts) if part)), ("Scored", scored)) if text]
    return f'<p class="lead">{"<br>".join(map(_text, lines))}</p>' if lines else ""


def table_page(
    title: str, header: list[str], rows: list[list[str]], numeric: list[bool], best: set[tuple[int, int]], notes: list[tuple[str, str]],
    figures: dict[str, bytes], generator: str = "mltk", keys: list[list] | None = None,
) -> str:
    """One self-contained page as wide as the window: a table whose columns sort on a click (the cells at ``best``
    (row, column) marked, ``keys`` the values numeric columns sort by: None for missing), in a box of its own that
    scrolls when the window is narrower, its first column staying in view; notes under it; the figures.

    Each note is (text, command): the command, if any, is shown as code after the text.
    """
    cells = rows if keys is None else [[(text, keys[r][c] if isinstance(keys[r][c], (int, float)) else None) for c, text in enumerate(row)] for r, row in enumerate(rows)]
    items = "".join(f"<li>{_text(text)}{f'<code>{_text(command)}</code>' if command else ''}</li>" for text, command in notes)
    table = _table(header, cells, numeric, best, css="sortable runs")
    return _page(title, f'<div class="wide">{table}</div>\n<ul class="notes">{items}</ul>\n{_sections(figures)}', generator, width=None)
