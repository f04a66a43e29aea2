"""Embeddings → metric values: retrieval from one nearest-neighbour pass, verification from pair scores.

A metric is a function ``fn(evaluation: Evaluation) -> dict[str, float]``, registered through the
``register_metrics`` hook. It reads the shared work from ``evaluation.neighbours()`` (the k nearest
gallery items of every query) and ``evaluation.pair_counts()`` (positive/negative pair counts per
score bin), each computed once, on first use; registered with ``needs="neighbours"`` or ``needs="pairs"``, it says
which it reads, so the all-pairs pass (``mltk.allpairs``) does only that work for it. The ROC math is ``mltk.roc``.

Embeddings are float32 and L2-normalised; scores are cosine similarities. The rules:

- Neighbours are ranked by similarity; a tie is broken by the lower gallery index, as a stable sort
  of ``-similarity`` does. The exact engines ("blocks", "flat") give exactly that order for the
  similarities they compute (their float rounding may differ from numpy's in the last bit).
- The approximate engines ("ivf", "ivfpq", "hnsw": a faiss index, ``mltk.knn``) may miss some of the true
  nearest neighbours. Their cost is measured: on a seeded sample of up to ``check_queries``
  queries the exact search runs too, and ``index_recall@k`` (the share of the exact k nearest the
  index found) and recall@1 of both on that sample are reported.
- Embeddings may be a float32 ``np.memmap`` (``mltk.embedding.embed(..., out=FILE)``): it is read
  block by block and never copied whole (a query or gallery that is not a contiguous range of rows
  is gathered, a copy of those rows).
- A query whose class has no other item in the gallery is left out of recall@k, precision@k and
  MAP@R (as pytorch-metric-learning does); ``queries_excluded`` counts them.
- Without an explicit pair list, the pairs are every pair of the evaluated set (i < j; with a
  query/gallery split, every query-gallery pair), counted in a histogram of ``mltk.allpairs.BINS`` bins over
  [-1, 1], never listed. A bin that holds more than ``allpairs.MERGED`` of the positive or of the negative
  pairs and more than one distinct score is counted again, in a pass of its own, split over its
  float32 values, and so on until no bin is: scores that share a bin move no rate (TPR, FPR, and
  so ROC-AUC, TAR@FAR, EER, accuracy) by more than ``allpairs.MERGED``, however concentrated they are, and
  equal float32 scores are ties, as in scikit-learn. Past ``max_pairs`` pairs, ``sample_pairs``
  pairs drawn uniformly at random (seeded) are scored exactly instead.
- Accuracy is 10-fold cross-validated: the threshold that maximises accuracy on nine folds (the
  highest one among equals) is applied to the tenth. Explicit pairs keep their folds (LFW's
  pairs.txt has ten) or are dealt into folds at random; for all pairs, the folds are ten
  contiguous ranges of the items holding about a tenth of the pairs each, a pair i < j belonging
  to the fold of item i. Where one kind of pair is more than ``BALANCED`` of them (all pairs of a
  set of many classes: 90 % and more are negatives, and calling every pair different would score
  that much), it is ``balanced_accuracy`` instead: the mean of TAR and TNR, maximised on nine folds
  and measured on the tenth (a fold without pairs of both kinds is left out); plain ``accuracy``
  stays for balanced pair lists such as LFW's.
- TAR@FAR is reported only where the negative pairs can measure that FAR: the false accepts it
  allows, FAR x negatives, must be at least ``min_false_accepts`` (30: Doddington's rule of 30, as
  ``mltk.thresholds`` marks its operating points ``reliable``). Elsewhere its value is None and
  ``Evaluation.not_measured`` says why (2 negative pairs cannot tell a FAR of 1e-4 from 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mltk import allpairs, knn
from mltk.allpairs import BLOCK, take_rows
from mltk.errors import UsageError
from mltk.roc import (  # the ROC math; these names are read from mltk.metrics too
    RULE_OF_30, Binned, NotApplicable, Roc, count_scores, cv_accuracy, equal_error, roc_auc_from_counts, roc_curve, tar_at, thin, unmeasured,
)

KS = (1, 2, 4, 8)
FARS = (1e-1, 1e-2, 1e-3, 1e-4)
FOLDS = 10
BALANCED = 0.55  # plain accuracy where neither kind is more than this share of the pairs (what calling all alike scores)
MAX_PAIRS = 10**10
SAMPLE_PAIRS = 10**7
EXACT_ENGINES = ("blocks", "flat")  # mltk's own blockwise pass; faiss's exact index
APPROXIMATE_ENGINES = knn.APPROXIMATE  # faiss's IVF, IVF-PQ and HNSW indexes
ENGINES = ("blocks",) + knn.KINDS  # "blocks", then the index kinds of mltk.knn, by the same names
CHECK_QUERIES = 1000  # queries on which an approximate engine is checked against the exact search


@dataclass(frozen=True, eq=False)
class Pairs:
    """An explicit pair list: a score per pair (higher = more alike), same or not, optional fold."""

    scores: np.ndarray
    same: np.ndarray
    folds: np.ndarray | None = None

    @classmethod
    def from_indices(cls, embeddings, first, second, same, folds=None) -> Pairs:
        """Pairs of rows of ``embeddings``, scored by cosine similarity."""
        e = np.asarray(embeddings, np.float32)
        return cls(_row_dots(e, e, np.asarray(first), np.asarray(second)), np.asarray(same, bool), folds)


@dataclass(frozen=True, eq=False)
class Neighbours:
    """The k nearest gallery items of each query, best first, as indices into the embeddings."""

    indices: np.ndarray  # (queries, k)
    similarities: np.ndarray  # (queries, k)
    match: np.ndarray  # (queries, k): the neighbour has the query's label
    relevant: np.ndarray  # (queries,): R, the other items of the query's class in the gallery

    @property
    def included(self) -> np.ndarray:
        return self.relevant > 0


@dataclass
class Results:
    """What ``evaluate_embeddings`` returns: flat values (metrics and info), the ROC curve, the evaluation."""

    values: dict[str, float]
    roc: Roc | None
    evaluation: Evaluation
    left_out: dict[str, str] = field(default_factory=dict)  # metric name -> why it does not apply (metrics=None only)
    not_measured: dict[str, str] = field(default_factory=dict)  # value -> why it is None (Evaluation.not_measured)


@dataclass
class Evaluation:
    """Embeddings, labels and the work metrics share, computed once.

    ``query``/``gallery`` (indices or boolean masks into ``embeddings``) split the items; without
    them every item is a query against all the others (leave-one-out). ``pairs`` replaces the
    all-pairs verification with an explicit pair list. ``engine`` picks the kNN pass: "blocks"
    (matrix products in blocks, one pass that also fills the pair histogram), "flat" (faiss, exact), or an
    approximate faiss index, "ivf", "ivfpq" or "hnsw", built with ``index_options`` (``mltk.index.build``:
    nlist, nprobe, m, ef_construction, ef_search) and checked on ``check_queries`` queries. ``rerank``
    (``mltk.rerank``) re-orders each query's ``rerank.candidates`` nearest before the retrieval metrics
    read them; the verification metrics score pairs, which re-ranking does not change.
    ``min_false_accepts`` is what a FAR must rest on for its TAR to be reported (0: every TAR@FAR).
    ``retrieval`` and ``verification`` say what the metrics will ask for: the blocks pass fills
    the kNN heaps and the all-pairs histogram together (one pass for both) only when both are
    wanted; one asked for anyway is computed then, in a pass of its own. ``device`` is where the blocks pass runs:
    a CUDA device, or the CPU for any other; None, the GPU when torch sees one (``mltk.allpairs``).
    """

    embeddings: np.ndarray | None
    labels: np.ndarray | None = None
    query: np.ndarray | None = None
    gallery: np.ndarray | None = None
    pairs: Pairs | None = None
    ks: tuple[int, ...] = KS
    fars: tuple[float, ...] = FARS
    folds: int = FOLDS
    max_pairs: int = MAX_PAIRS
    sample_pairs: int = SAMPLE_PAIRS
    seed: int = 0
    engine: str = "blocks"
    block: int = BLOCK
    index_options: dict = field(default_factory=dict)
    check_queries: int = CHECK_QUERIES
    rerank: object | None = None
    retrieval: bool = True
    verification: bool = True
    info: dict[str, float] = field(default_factory=dict)
    min_false_accepts: int = RULE_OF_30
    device: str | None = None
    not_measured: dict[str, str] = field(default_factory=dict, init=False)  # a value the data cannot measure (None) -> why
    loo: bool = field(default=True, init=False)
    _neighbours: Neighbours | None = field(default=None, init=False, repr=False)
    _counts: Binned | None = field(default=None, init=False, repr=False)
    _roc: Roc | None = field(default=None, init=False, repr=False)
    _index: object | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.embeddings is None:
            if self.pairs is None:
                raise UsageError("give embeddings, or pairs to score")
            return
        self.embeddings = _check_embeddings(self.embeddings)
        n = len(self.embeddings)
        if self.labels is not None:
            self.labels = np.unique(np.asarray(self.labels), return_inverse=True)[1].reshape(-1)
            if len(self.labels) != n:
                raise UsageError(f"{len(self.labels)} labels for {n} embeddings")
        self.loo, self.query, self.gallery = _split(self.query, self.gallery, n)

    @property
    def total_pairs(self) -> int:
        nq, ng = len(self.query), len(self.gallery)
        return nq * (nq - 1) // 2 if self.loo else nq * ng

    def neighbours(self) -> Neighbours:
        """The k nearest of every query, k = max(ks, largest R); computed on first use."""
        if self._neighbours is None:
            if self.labels is None or self.embeddings is None:
                raise NotApplicable("retrieval metrics need embeddings and labels")
            self._pass_k()  # a gallery with nothing to retrieve fails here, before any work
            if self.engine == "blocks":
                self._block_pass(knn=True, hist=self.verification and self._all_pairs_pending())
            else:
                self._set_neighbours(*self._index_neighbours())
        return self._neighbours

    def pair_counts(self) -> Binned:
        """Positive and negative pair counts per score bin and fold; computed on first use."""
        if self._counts is None:
            if self.pairs is not None:
                self._set_counts(self.pairs, sampled=False)
            elif self.labels is None:
                raise NotApplicable("verification metrics need labels or a pair list")
            elif self.total_pairs > self.max_pairs:
                self._set_counts(_sample_pairs(self), sampled=True)
            else:
                knn = self.retrieval and self._neighbours is None and self.engine == "blocks" and self._available() > 0
                self._block_pass(knn=knn, hist=True)
        return self._counts

    @property
    def pairs_scored(self) -> bool:
        """Pairs of both kinds were counted (the verification metrics ran): there is a ROC curve."""
        return self._counts is not None and bool(self._counts.positive.sum()) and bool(self._counts.negative.sum())

    def roc(self) -> Roc:
        """Every point of the ROC curve of the pair counts."""
        if self._roc is None:
            self._roc = roc_curve(self.pair_counts())
        return self._roc

    def examples(self, count: int, k: int, seed: int = 0) -> tuple[np.ndarray, Neighbours]:
        """A seeded sample of up to ``count`` queries that have another item of their class in the gallery (their
        positions in ``query``) and their k nearest, k clipped to what a query can retrieve: a report's retrieval
        examples. Only these queries are searched (exactly), not every query as ``neighbours()`` does."""
        if self.labels is None or self.embeddings is None:
            raise NotApplicable("retrieval examples need embeddings and labels")
        relevant = self._relevant()
        rows = np.flatnonzero(relevant > 0)
        rows = np.random.default_rng(seed).choice(rows, min(count, len(rows)), replace=False) if len(rows) else rows
        k = min(k, self._available())
        if len(rows) == 0:
            return rows, Neighbours(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros((0, k), bool), relevant[:0])
        queries = self.embeddings[self.query[rows]]
        similarities, positions = knn.exact_neighbours(queries, take_rows(self.embeddings, self.gallery), k, own=rows if self.loo else None)
        indices = self.gallery[positions]
        match = self.labels[indices] == self.labels[self.query[rows]][:, None]
        return rows, Neighbours(indices, similarities, match, relevant[rows])

    def _all_pairs_pending(self) -> bool:
        return self._counts is None and self.pairs is None and self.labels is not None and self.total_pairs <= self.max_pairs

    def _block_pass(self, knn: bool, hist: bool) -> None:
        """One pass for what is asked: kNN (blocks engine) and the all-pairs histogram."""
        k = self._list_k() if knn else 1
        heaps, counts = allpairs.block_pass(self, k, knn, hist)
        if knn:
            self._set_neighbours(*heaps)
        if hist:
            self._counts = counts
            self._count_info(counts, self.total_pairs, sampled=False)

    def _index_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        """kNN from a faiss index over the gallery; an approximate one is checked against the exact search."""
        k = self._list_k()
        q, g = take_rows(self.embeddings, self.query), take_rows(self.embeddings, self.gallery)
        own = np.arange(len(q)) if self.loo else None
        if self.engine == "flat":
            return knn.neighbours(knn.build(g), q, k, own=own, gallery=g, block=self.block)
        index = self._index = knn.build(g, self.engine, seed=self.seed, **self.index_options)
        sims, positions = knn.neighbours(index, q, k, own=own, block=self.block)
        self.info.update({"index": self.engine, **{f"index_{key}": v for key, v in knn.settings(index).items()}})
        if self.check_queries > 0:
            self._check_index(q, g, own, positions)
        return sims, positions

    def _check_index(self, q: np.ndarray, g: np.ndarray, own: np.ndarray | None, positions: np.ndarray) -> None:
        """index_recall@k, and recall@1 of the index and of the exact search, on a seeded sample of queries."""
        sample, exact, recalls = knn.check(positions, q, g, self.ks, own, self.check_queries, self.seed)
        self.info.update(index_check_queries=len(sample), **recalls)
        query_labels, gallery_labels = self.labels[self.query][sample], self.labels[self.gallery]
        scored = self._relevant()[sample] > 0
        if scored.any():
            hit = lambda found: float((gallery_labels[found[scored, 0]] == query_labels[scored]).mean())  # noqa: E731
            self.info.update({"index_check_recall@1_exact": hit(exact), "index_check_recall@1_index": hit(positions[sample])})

    def _available(self) -> int:
        """Gallery items a query can retrieve (itself left out)."""
        return len(self.gallery) - self.loo

    def _pass_k(self) -> int:
        """Neighbours per query: the largest k of ``ks`` the gallery allows, or R (MAP@R) where larger."""
        available = self._available()
        if available < 1:
            raise NotApplicable("the gallery holds nothing a query can retrieve")
        return max(max((k for k in self.ks if k <= available), default=1), int(self._relevant().max(initial=0)))

    def _list_k(self) -> int:
        """Neighbours per query to find: what the metrics need, or the re-ranker's candidates where more."""
        wanted = getattr(self.rerank, "candidates", 0) if self.rerank is not None else 0
        return max(self._pass_k(), min(int(wanted), self._available()))

    def check_ks(self) -> None:
        """recall@k and precision@k need every k of ``ks`` within the gallery: one line when one is not."""
        if self.labels is None or self.embeddings is None:
            raise NotApplicable("retrieval metrics need embeddings and labels")
        if max(self.ks) > self._available():
            raise NotApplicable(f"k={max(self.ks)} is more than the {self._available()} gallery items a query can retrieve")

    def _relevant(self) -> np.ndarray:
        counts = np.bincount(self.labels[self.gallery], minlength=self.labels.max() + 1)
        return counts[self.labels[self.query]] - self.loo

    def _set_neighbours(self, similarities: np.ndarray, positions: np.ndarray) -> None:
        if self.rerank is not None:
            similarities, positions = self._reranked(similarities, positions)
        k = self._pass_k()
        similarities, positions = similarities[:, :k], positions[:, :k]
        indices = self.gallery[positions]
        relevant = self._relevant()
        match = self.labels[indices] == self.labels[self.query][:, None]
        self._neighbours = Neighbours(indices, similarities, match, relevant)
        self.info.update(queries=int((relevant > 0).sum()), queries_excluded=int((relevant == 0).sum()))

    def _reranked(self, similarities: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lists after ``rerank``, timed; more lists it asks for come from the same index (exact: a flat one)."""
        import time

        from mltk.rerank import Candidates

        started = time.perf_counter()
        index = self._index
        search = None if index is None else lambda vectors, k: knn.search(index, vectors, k, self.block)  # noqa: E731
        q, g = take_rows(self.embeddings, self.query), take_rows(self.embeddings, self.gallery)
        candidates = Candidates(q, g, similarities, positions, own=np.arange(len(q)) if self.loo else None, search=search)
        similarities, positions = self.rerank(candidates)
        if positions.shape[1] < self._pass_k():
            raise UsageError(f"the re-ranker returned {positions.shape[1]} neighbours a query; the metrics need {self._pass_k()}")
        self.info["rerank_seconds"] = time.perf_counter() - started
        return similarities, positions

    def _set_counts(self, pairs: Pairs, sampled: bool) -> None:
        folds = pairs.folds
        if folds is None:  # deal the pairs into folds of (nearly) equal size
            folds = np.random.default_rng(self.seed).permutation(len(pairs.scores)) % self.folds
        self._counts = count_scores(np.asarray(pairs.scores), np.asarray(pairs.same, bool), np.asarray(folds))
        self._count_info(self._counts, self.total_pairs if sampled else len(pairs.scores), sampled)

    def _count_info(self, counts: Binned, total: int, sampled: bool) -> None:
        positive, negative = int(counts.positive.sum()), int(counts.negative.sum())
        self.info.update(pairs=positive + negative, pairs_positive=positive, pairs_total=total, pairs_sampled=int(sampled))


# ---- input checks ------------------------------------------------------------------------------


def _check_embeddings(embeddings) -> np.ndarray:
    e = np.ascontiguousarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or len(e) < 2:
        raise UsageError(f"embeddings must be a 2-D array of at least two rows, not shape {e.shape}")
    squared = np.einsum("ij,ij->i", e, e)  # no N x D temporary; a NaN or inf anywhere shows here too
    if not np.isfinite(squared).all():
        raise UsageError("embeddings contain NaN or infinite values")
    if np.abs(squared - 1).max() > 2e-3:
        raise UsageError("embeddings must be L2-normalised (x / np.linalg.norm(x, axis=1, keepdims=True))")
    return e


def _split(query, gallery, n: int) -> tuple[bool, np.ndarray, np.ndarray]:
    """(leave-one-out?, query indices, gallery indices) from indices or masks."""
    if query is None and gallery is None:
        everything = np.arange(n)
        return True, everything, everything
    if query is None or gallery is None:
        raise UsageError("give both query and gallery, or neither (leave-one-out)")
    q, g = (np.flatnonzero(s) if np.asarray(s).dtype == bool else np.asarray(s, np.int64) for s in (query, gallery))
    if len(q) == 0 or len(g) == 0:
        raise UsageError("the query and the gallery must not be empty")
    if np.array_equal(np.sort(q), np.sort(g)):
        q = np.sort(q)
        return True, q, q
    shared = np.intersect1d(q, g)
    if len(shared):
        raise UsageError(f"query and gallery share {len(shared)} items; give disjoint sets, or the same set for leave-one-out")
    return False, q, g


def _row_dots(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """a[i] . b[j] row by row, in chunks so memory stays bounded."""
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        out[s : s + chunk] = np.einsum("ij,ij->i", a[i[s : s + chunk]], b[j[s : s + chunk]])
    return out


# ---- sampled pairs ------------------------------------------------------------------------------


def _sample_pairs(ev: Evaluation) -> Pairs:
    """``sample_pairs`` pairs drawn uniformly (with replacement) from all the pairs, seeded."""
    rng = np.random.default_rng(ev.seed)
    n = ev.sample_pairs
    i = rng.integers(0, len(ev.query), n)
    j = rng.integers(0, len(ev.gallery) - ev.loo, n)
    if ev.loo:  # j uniform over the items other than i
        j += j >= i
    q, g = ev.query[i], ev.gallery[j]
    return Pairs(_row_dots(ev.embeddings, ev.embeddings, q, g), ev.labels[q] == ev.labels[g])


# ---- the registered metrics ----------------------------------------------------------------------


def _scored(ev: Evaluation) -> Neighbours:
    nb = ev.neighbours()
    if not nb.included.any():
        raise NotApplicable("no query has another item of its class in the gallery")
    return nb


def recall_at_k(ev: Evaluation) -> dict[str, float]:
    """recall@k (hit@k): the share of queries with an item of their class among their k nearest."""
    ev.check_ks()
    nb = _scored(ev)
    match = nb.match[nb.included]
    return {f"recall@{k}": float(match[:, :k].any(1).mean()) for k in ev.ks}


def precision_at_k(ev: Evaluation) -> dict[str, float]:
    """precision@k: the mean share of items of the query's class among its k nearest."""
    ev.check_ks()
    nb = _scored(ev)
    match = nb.match[nb.included]
    return {f"precision@{k}": float(match[:, :k].mean()) for k in ev.ks}


def map_at_r(ev: Evaluation, chunk: int = 8192) -> dict[str, float]:
    """MAP@R (Musgrave et al. 2020): the mean of the queries' AP@R."""
    nb = _scored(ev)
    rows = np.flatnonzero(nb.included)
    total = 0.0
    for s in range(0, len(rows), chunk):
        total += float(average_precision_at_r(nb.match[rows[s : s + chunk]], nb.relevant[rows[s : s + chunk]]).sum())
    return {"map@r": total / len(rows)}


def average_precision_at_r(match: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Each query's AP@R: precision at each hit among its first R neighbours, summed, over R (``relevant``, each > 0)."""
    rank = np.arange(1, match.shape[1] + 1)
    hit = match & (rank <= relevant[:, None])
    return (np.cumsum(hit, 1) / rank * hit).sum(1) / relevant


def roc_auc(ev: Evaluation) -> dict[str, float]:
    """Area under the ROC curve of the pair scores."""
    return {"roc_auc": roc_auc_from_counts(ev.pair_counts())}


def tar_at_far(ev: Evaluation) -> dict[str, float]:
    """True-accept rate at false-accept rates ``fars`` (no interpolation between ROC points), where the negative pairs can measure them."""
    roc, negatives = ev.roc(), int(ev.pair_counts().negative.sum())
    values = {}
    for far in ev.fars:
        key, why = f"tar@far={far:g}", unmeasured(far, negatives, ev.min_false_accepts)
        if why is not None:
            ev.not_measured[key] = why
        values[key] = tar_at(roc, far) if why is None else None
    return values


def eer(ev: Evaluation) -> dict[str, float]:
    """Equal error rate, where the false-accept and false-reject rates meet, and its threshold."""
    rate, threshold = equal_error(ev.roc())
    return {"eer": rate, "eer_threshold": threshold}


def accuracy_10fold(ev: Evaluation) -> dict[str, float]:
    """Verification accuracy at a threshold cross-validated over 10 folds: balanced_accuracy, the mean of TAR and TNR, where one kind of pair is over 55 %."""
    counts = ev.pair_counts()
    positive, negative = int(counts.positive.sum()), int(counts.negative.sum())
    balanced = max(positive, negative) > BALANCED * (positive + negative)
    mean, std, threshold = cv_accuracy(counts, balanced)
    name = "balanced_accuracy" if balanced else "accuracy"
    return {name: mean, f"{name}_std": std, f"{name}_threshold": threshold}


def evaluate_embeddings(
    embeddings,
    labels=None,
    *,
    query=None,
    gallery=None,
    pairs: Pairs | None = None,
    metrics=None,
    ks=KS,
    fars=FARS,
    folds: int = FOLDS,
    max_pairs: int = MAX_PAIRS,
    sample_pairs: int = SAMPLE_PAIRS,
    seed: int = 0,
    engine: str = "blocks",
    block: int = BLOCK,
    index_options: dict | None = None,
    check_queries: int = CHECK_QUERIES,
    rerank=None,
    min_false_accepts: int = RULE_OF_30,
    device: str | None = None,
) -> Results:
    """Every registered metric (or those named in ``metrics``) on the embeddings, plus info.

    ``values`` holds the metrics and ``queries``, ``queries_excluded``, ``pairs``, ``pairs_positive``,
    ``pairs_total``, ``pairs_sampled`` for the work that was done; an approximate ``engine`` adds
    ``index``, its settings (``index_nlist``, ``index_nprobe`` / ``index_m``, ``index_ef_search``) and
    its check against the exact search (``index_check_queries``, ``index_recall@k``,
    ``index_check_recall@1_exact`` and ``_index``). With ``metrics=None`` a metric that does not
    apply (no labels, a set too small for k, say) is left out; a named one raises instead, its name first.
    Only the work the chosen metrics need is done: a metric registered with ``needs="neighbours"`` reads only
    ``Evaluation.neighbours()``, one with ``needs="pairs"`` only ``Evaluation.pair_counts()``, and one that declares
    nothing may read both, so the blocks pass computes both for it. ``device`` is where that pass runs (``Evaluation``).
    ``rerank`` (a re-ranker, ``mltk.rerank``) re-orders the neighbour lists first and adds ``rerank_seconds``. A value
    the data cannot measure (a TAR at a FAR too low for the negative pairs: ``min_false_accepts``) is None, and
    ``not_measured`` says why.
    """
    from mltk import registry

    chosen = registry.list_metrics() if metrics is None else list(metrics)
    entries = {name: registry.get("metrics", name) for name in chosen}  # unknown names fail first
    ev = Evaluation(
        embeddings, labels, query=query, gallery=gallery, pairs=pairs, ks=tuple(ks), fars=tuple(fars), folds=folds,
        max_pairs=max_pairs, sample_pairs=sample_pairs, seed=seed, engine=engine, block=block,
        index_options=dict(index_options or {}), check_queries=check_queries, rerank=rerank, min_false_accepts=min_false_accepts,
        retrieval=any(e.needs != "pairs" for e in entries.values()), verification=any(e.needs != "neighbours" for e in entries.values()),
        device=device,
    )
    values: dict[str, float] = {}
    left_out: dict[str, str] = {}
    for name, entry in entries.items():
        try:
            values.update(entry.factory(ev))
        except NotApplicable as exc:
            if metrics is not None:
                raise NotApplicable(f"{name}: {exc}") from None
            left_out[name] = str(exc)
    roc = thin(ev.roc()) if ev.pairs_scored else None
    return Results({**values, **ev.info}, roc, ev, left_out, dict(ev.not_measured))
