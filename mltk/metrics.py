"""Embeddings → metric values: retrieval from one nearest-neighbour pass, verification from pair scores.

A metric is a function ``fn(evaluation: Evaluation) -> dict[str, float]``, registered through the
``register_metrics`` hook. It reads the shared work from ``evaluation.neighbours()`` (the k nearest
gallery items of every query) and ``evaluation.pair_counts()`` (positive/negative pair counts per
score bin), each computed once, on first use.

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
  query/gallery split, every query-gallery pair), counted in a histogram of ``BINS`` bins over
  [-1, 1], never listed. A bin that holds more than ``MERGED`` of the positive or of the negative
  pairs and more than one distinct score is counted again, in a pass of its own, split over its
  float32 values, and so on until no bin is: scores that share a bin move no rate (TPR, FPR, and
  so ROC-AUC, TAR@FAR, EER, accuracy) by more than ``MERGED``, however concentrated they are, and
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

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mltk import knn
from mltk.errors import UsageError

KS = (1, 2, 4, 8)
FARS = (1e-1, 1e-2, 1e-3, 1e-4)
FOLDS = 10
BALANCED = 0.55  # plain accuracy where neither kind is more than this share of the pairs (what calling all alike scores)
RULE_OF_30 = 30  # false accepts behind a FAR before it counts as measured (Doddington): TAR@FAR, and thresholds' ``reliable``
MAX_PAIRS = 10**10
SAMPLE_PAIRS = 10**7
BINS = 1 << 20
MERGED = 1e-4  # the most of the positive or of the negative pairs one bin of distinct scores may hold
SPLIT = BINS // 4  # bins a pass that splits heavy bins may use, over all of them
BLOCK = 4096
GPU_BLOCK = 16384  # rows a block of the pass on a GPU at least: 1 GiB of float32 similarities, fewer launches and syncs
EXACT_ENGINES = ("blocks", "flat")  # mltk's own blockwise pass; faiss's exact index
APPROXIMATE_ENGINES = knn.APPROXIMATE  # faiss's IVF, IVF-PQ and HNSW indexes
ENGINES = ("blocks",) + knn.KINDS  # "blocks", then the index kinds of mltk.knn, by the same names
CHECK_QUERIES = 1000  # queries on which an approximate engine is checked against the exact search
_WORST = -3.0  # below any cosine similarity: an empty heap slot


class NotApplicable(UsageError):
    """A metric that cannot be computed from what was given (no labels, a single class, ...)."""


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


@dataclass(frozen=True, eq=False)
class Binned:
    """Pair counts per score bin and fold; bins in descending order, bin t holds scores >= thresholds[t]."""

    thresholds: np.ndarray  # (T,)
    positive: np.ndarray  # (folds, T)
    negative: np.ndarray  # (folds, T)


@dataclass(frozen=True, eq=False)
class Roc:
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


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
    wanted; one asked for anyway is computed then, in a pass of its own.
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
        similarities, positions = knn.exact_neighbours(queries, _rows(self.embeddings, self.gallery), k, own=rows if self.loo else None)
        indices = self.gallery[positions]
        match = self.labels[indices] == self.labels[self.query[rows]][:, None]
        return rows, Neighbours(indices, similarities, match, relevant[rows])

    def _all_pairs_pending(self) -> bool:
        return self._counts is None and self.pairs is None and self.labels is not None and self.total_pairs <= self.max_pairs

    def _block_pass(self, knn: bool, hist: bool) -> None:
        """One pass for what is asked: kNN (blocks engine) and the all-pairs histogram."""
        k = self._list_k() if knn else 1
        heaps, counts = _block_pass(self, k, knn, hist)
        if knn:
            self._set_neighbours(*heaps)
        if hist:
            self._counts = counts
            self._count_info(counts, self.total_pairs, sampled=False)

    def _index_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        """kNN from a faiss index over the gallery; an approximate one is checked against the exact search."""
        k = self._list_k()
        q, g = _rows(self.embeddings, self.query), _rows(self.embeddings, self.gallery)
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
        q, g = _rows(self.embeddings, self.query), _rows(self.embeddings, self.gallery)
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
        self._counts = _binned_scores(np.asarray(pairs.scores), np.asarray(pairs.same, bool), np.asarray(folds))
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


def _rows(x, rows: np.ndarray):
    """x[rows]: a view when ``rows`` is a contiguous range (a memmap stays on disk), else a copy of those rows."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        return x[int(rows[0]) : int(rows[0]) + len(rows)]
    return x[rows]


def _row_dots(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """a[i] . b[j] row by row, in chunks so memory stays bounded."""
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        out[s : s + chunk] = np.einsum("ij,ij->i", a[i[s : s + chunk]], b[j[s : s + chunk]])
    return out


# ---- the blockwise pass: BLAS products; numba kernels (or, on a GPU, torch) consume each block ---------


def _kernels():
    """The kernels that consume a block of similarities (``mltk.metrics_kernels``: numba, GIL released)."""
    from mltk import metrics_kernels as k

    return k.rows, k.cols, k.sort_heaps, k.recount


def _fold_blocks(n: int, loo: bool, folds: int, block: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Row blocks of at most ``block`` rows that never straddle a fold, and the fold of each."""
    pairs_per_row = np.arange(n - 1, -1, -1) if loo else np.ones(n)  # row i pairs with j > i
    before = np.concatenate([[0], np.cumsum(pairs_per_row)])
    edges = np.searchsorted(before, before[-1] * np.arange(folds + 1) / folds)
    edges[0], edges[-1] = 0, n
    blocks, fold_of = [], []
    for f in range(folds):
        for r0 in range(edges[f], edges[f + 1], block):
            blocks.append((int(r0), int(min(r0 + block, edges[f + 1]))))
            fold_of.append(f)
    return blocks, fold_of


def _block_pass(ev: Evaluation, k: int, knn: bool, hist: bool):
    """Similarities block by block (``_sweep``); each block feeds the kNN heaps and the per-fold histograms.

    A leave-one-out block's rows feed their queries' heaps and the histogram, its columns their
    queries' heaps. The gallery is offered to each query in index order, so a tie never displaces
    an earlier item. Bins too heavy to merge are counted again after (``_resolve``).
    """
    qlab, glab = ev.labels[ev.query], ev.labels[ev.gallery]
    if _torch_pass():  # the blocks are consumed where they are computed (mltk.gpu_pass): none comes to the host
        from mltk.gpu_pass import BlockConsumer

        consumer = BlockConsumer(qlab, glab, k=k, knn=knn, hist=hist, folds=ev.folds, loo=ev.loo, bins=BINS, empty=_WORST, device=_device(), compile=True)
        _sweep(ev, 1, consumer.consume, consumer.fold_done if hist else None, on_device=True)
        heaps, by_fold = consumer.result()
        consumer = None  # its device memory
    else:
        heaps, by_fold = _numba_pass(ev, k, knn, hist, qlab, glab)
    used = np.flatnonzero(by_fold.sum(axis=(0, 1)))
    counts = by_fold[:, :, used]
    by_fold = None  # the full-size histograms: freed before any pass that splits heavy bins
    return heaps, (_resolve(ev, used, counts) if hist else None)


def _numba_pass(ev: Evaluation, k: int, knn: bool, hist: bool, qlab: np.ndarray, glab: np.ndarray):
    """``_block_pass`` on the CPU, by the numba kernels: ((similarities, indices) best first, counts (folds, same?, bin))."""
    rows_kernel, cols_kernel, sort_heaps, _ = _kernels()
    threads = _threads()
    by_label = np.argsort(glab, kind="stable")  # gallery positions, class by class, in order
    label_start = np.searchsorted(glab[by_label], np.arange(ev.labels.max() + 2))
    hv = np.full((len(ev.query), k if knn else 1), _WORST, np.float32)
    hi = np.full(hv.shape, np.iinfo(np.int64).max, np.int64)
    counts = _FoldCounts(ev.folds, threads, BINS if hist else 1, ev.block)

    def consume(S, r0, c0, diagonal, split):
        split(len(S), lambda lo, hi_, t: rows_kernel(S, lo, hi_, r0, c0, diagonal, knn, hv, hi, hist, qlab, by_label, label_start, counts.every[t], counts.same[t]))
        counts.counted(S.size)
        if knn and ev.loo and not diagonal:
            thr = hv[c0 : c0 + S.shape[1], 0].copy()
            split(S.shape[1], lambda lo, hi_, t: cols_kernel(S, lo, hi_, r0, c0, hv, hi, thr))

    _sweep(ev, threads, consume, counts.fold_done if hist else None)
    if knn:
        sort_heaps(hv, hi)
    return (hv, hi), counts.by_fold


def _int32_room(block: int) -> int:
    """Pairs int32 counts may hold and still take one more block of ``block`` rows; 0 where a block could overflow them
    alone (more than 32,768 rows), and int64 counts are kept instead."""
    return 2**31 - 1 - block * block if block * block <= 2**30 else 0


class _FoldCounts:
    """The first pass's histograms. The threads count every pair in int32 (the hot loop is one increment, no label
    test) and the pairs of one class apart in int64; both are added into the fold's int64 (negative, positive)
    counts when the fold is done, and the int32 ones before one more block could overflow them."""

    def __init__(self, folds: int, threads: int, bins: int, block: int):
        self.limit = _int32_room(block)
        self.every = np.zeros((threads, bins), np.int32 if self.limit else np.int64)
        self.same = np.zeros((threads, bins), np.int64)
        self.pending = np.zeros(bins, np.int64)  # every pair of the fold so far, from the int32 counts
        self.by_fold = np.zeros((folds, 2, bins), np.int64)
        self.since = 0  # pairs counted into ``every`` since it was last emptied (at most, on one thread)

    def counted(self, pairs: int) -> None:
        self.since += pairs
        if self.limit and self.since > self.limit:
            self._empty()

    def _empty(self) -> None:
        self.pending += self.every.sum(0, dtype=np.int64)
        self.every[:] = 0
        self.since = 0

    def fold_done(self, f: int) -> None:
        self._empty()
        same = self.same.sum(0)
        self.by_fold[f, 0] += self.pending - same
        self.by_fold[f, 1] += same
        self.pending[:] = 0
        self.same[:] = 0


def _sweep(ev: Evaluation, threads: int, consume, fold_done=None, on_device: bool = False) -> None:
    """Every block of similarities, ``consume(S, r0, c0, diagonal, split)``, the row blocks in fold order.

    ``split(n, work)`` runs ``work(lo, hi, thread)`` over ``threads`` slices of range(n) at once;
    ``fold_done(f)`` is called once the rows of fold f are all consumed. Leave-one-out computes
    only the blocks on and above the diagonal (the matrix is symmetric). S is a numpy array, or with
    ``on_device`` a torch tensor on the GPU, in blocks of at least ``GPU_BLOCK`` rows there.
    """
    ng = len(ev.gallery)
    block = max(ev.block, GPU_BLOCK) if on_device else ev.block
    row_blocks, fold_of = _fold_blocks(len(ev.query), ev.loo, ev.folds, block)
    col_blocks = row_blocks if ev.loo else [(c, min(c + block, ng)) for c in range(0, ng, block)]

    with ThreadPoolExecutor(threads) as pool, _one_blas_thread():

        def split(n, work):
            edges = np.linspace(0, n, threads + 1).astype(int)
            list(pool.map(lambda t: work(edges[t], edges[t + 1], t), range(threads)))

        product = _products(ev, _device(), block, on_device, split)

        for b, (r0, r1) in enumerate(row_blocks):
            for c0, c1 in col_blocks[b:] if ev.loo else col_blocks:
                consume(product(r0, r1, c0, c1), r0, c0, ev.loo and r0 == c0, split)
            if fold_done and (b + 1 == len(row_blocks) or fold_of[b + 1] != fold_of[b]):
                fold_done(fold_of[b])


def _products(ev: Evaluation, device: str, block: int, on_device: bool, split):
    """The block of similarities of query rows [r0, r1) and gallery rows [c0, c1), as a function of (r0, r1, c0, c1):
    a float32 numpy array, or with ``on_device`` a torch tensor on ``device``; a buffer reused by the next call
    (fresh pages cost page faults).

    On the CPU numpy's BLAS computes it, each of ``split``'s threads its share of the rows with one BLAS thread
    (``_one_blas_thread``): BLAS's own worker threads would keep spinning after each product, on the cores the
    kernels that consume the block need. On a GPU torch computes it, in float32 (TF32 as torch's settings allow).
    """
    import torch

    q = _rows(ev.embeddings, ev.query)
    g = q if ev.loo else _rows(ev.embeddings, ev.gallery)
    if device == "cpu":
        buffer = np.empty(block * block, np.float32)

        def matmul(r0, r1, c0, c1):
            S = buffer[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            split(r1 - r0, lambda lo, hi, t: np.matmul(q[r0 + lo : r0 + hi], g[c0:c1].T, out=S[lo:hi]))
            return S

        return (lambda *rows: torch.from_numpy(matmul(*rows))) if on_device else matmul
    tq = _tensor(q, device)
    tg = tq if ev.loo else _tensor(g, device)
    buffer = torch.empty(block * block, device=device)

    def product(r0, r1, c0, c1):
        S = torch.mm(tq(r0, r1), tg(c0, c1).T, out=buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
        return S if on_device else S.cpu().numpy()

    return product


def _one_blas_thread():
    """BLAS limited to one thread inside the block (threadpoolctl): the pass runs its products in its own threads."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _device() -> str:
    """Where the blockwise pass runs: the GPU when torch sees one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_pass() -> bool:
    """Whether the blocks are consumed with torch where they are (mltk.gpu_pass), rather than by the numba kernels on
    the CPU: on a GPU, where the kernels would need every block copied to the host (2 TB at N = 1,000,000)."""
    return _device() != "cpu"


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def _flush(fine: np.ndarray, by_fold: np.ndarray):
    """A ``fold_done`` for ``_sweep``: the threads' counts (threads, same?, bin), added to the finished fold's."""

    def done(f: int) -> None:
        by_fold[f] += fine.sum(0)
        fine[:] = 0

    return done


def _tensor(x: np.ndarray, device: str):
    """Rows [a, b) of ``x`` as a torch tensor on ``device``, as a function of (a, b).

    The whole array is copied to the GPU when it takes at most half its free memory; a bigger one is
    copied block by block as the pass reaches it (on the CPU the tensor shares the array's memory).
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(x)
    if device != "cpu" and t.nbytes > torch.cuda.mem_get_info()[0] // 2:
        return lambda a, b: t[a:b].to(device)
    t = t.to(device)
    return lambda a, b: t[a:b]


# ---- bins too heavy to merge: counted again, split over their float32 values ----------------------
#
# A float32 score's key is an integer that orders scores as their values do (-0.0 and 0.0 share
# key 0), so a range of keys is a range of scores, and a range of one key is a single score.


def _resolve(ev: Evaluation, bins: np.ndarray, counts: np.ndarray) -> Binned:
    """The pass's histogram (its used ``bins``, ``counts`` (folds, same?, bin)) as Binned, every bin that holds two or
    more pairs, more than ``MERGED`` of the positive or of the negative pairs and more than one float32 value
    counted again, split into ranges of keys, pass after pass until no bin does (each pass splits ranges at
    least in two, so at most 32 passes; one or two when the scores are concentrated in a few bins)."""
    totals = counts.sum(axis=(0, 2))  # negative, positive
    thresholds = -1 + 2 * bins / BINS
    lo = hi = None
    kept = []  # (pass bin, first key, threshold, counts) of the bins left as they are, pass by pass
    while True:
        heavy = (counts.sum(0) > MERGED * totals[:, None]).any(0) & (counts.sum(axis=(0, 1)) > 1)
        if lo is None:  # the first pass's bins: the keys of their scores, for the heavy ones only
            lo, hi = np.zeros(len(bins), np.int64), np.zeros(len(bins), np.int64)
            lo[heavy], hi[heavy] = _first_key(bins[heavy]), _first_key(bins[heavy] + 1)
        heavy &= hi - lo > 1
        kept.append((bins[~heavy], lo[~heavy], thresholds[~heavy], counts[:, :, ~heavy]))
        if not heavy.any():
            break
        bins, lo, hi, counts = _recount(ev, bins[heavy], lo[heavy], hi[heavy])
        thresholds = _key_value(lo).astype(np.float64)
    bins, lo, thresholds, counts = (np.concatenate(part, axis=-1) for part in zip(*kept))
    order = np.lexsort((lo, bins))[::-1]  # descending scores
    return Binned(thresholds[order], counts[:, 1, order], counts[:, 0, order])


def _recount(ev: Evaluation, bins: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """One more pass over all pairs: the ranges of keys [lo, hi) (within the first pass's ``bins``, sorted by bin then
    key) each split into at most ``SPLIT // len(lo)`` equal ranges. Returns those that hold pairs as (bins, lo, hi,
    counts (folds, same?, range)), each narrowed to the keys it holds: [its least, its greatest + 1)."""
    pieces = np.minimum(hi - lo, max(2, SPLIT // len(lo)))
    offset = np.concatenate([[0], np.cumsum(pieces)])
    first = np.searchsorted(bins, np.arange(BINS + 1))  # the ranges in bin b: first[b] to first[b + 1]
    qlab, glab = ev.labels[ev.query], ev.labels[ev.gallery]
    if _torch_pass():  # on the GPU, where the blocks are (mltk.gpu_pass)
        from mltk.gpu_pass import RecountConsumer

        consumer = RecountConsumer(qlab, glab, folds=ev.folds, loo=ev.loo, first=first, lo=lo, hi=hi, pieces=pieces, offset=offset, device=_device())
        _sweep(ev, 1, consumer.consume, consumer.fold_done, on_device=True)
        by_fold, low, high = consumer.result()
    else:
        *_, recount_kernel = _kernels()
        threads = _threads()
        fine = np.zeros((threads, 2, offset[-1]), np.int64)
        by_fold = np.zeros((ev.folds, 2, offset[-1]), np.int64)
        low, high = np.full((threads, offset[-1]), np.iinfo(np.int64).max), np.full((threads, offset[-1]), np.iinfo(np.int64).min)

        def consume(S, r0, c0, diagonal, split):
            K = S.view(np.int32)
            split(len(S), lambda a, z, t: recount_kernel(S, K, a, z, r0, c0, diagonal, qlab, glab, first, lo, hi, pieces, offset, fine[t], low[t], high[t]))

        _sweep(ev, threads, consume, _flush(fine, by_fold))
        low, high = low.min(0), high.max(0)
    used = by_fold.sum(axis=(0, 1)) > 0
    cell = np.repeat(np.arange(len(lo)), pieces)[used]
    return bins[cell], low[used], high[used] + 1, by_fold[:, :, used]


def _key_value(key: np.ndarray) -> np.ndarray:
    """The float32 score of each key."""
    return np.where(key >= 0, key, 0x80000000 - key).astype(np.uint32).view(np.float32)


def _bin_of(scores: np.ndarray) -> np.ndarray:
    """The first pass's bin of each score, computed as its kernel does (in float64)."""
    return np.clip(np.floor((scores.astype(np.float64) + 1.0) * (BINS / 2)), 0, BINS - 1).astype(np.int64)


def _first_key(bins: np.ndarray) -> np.ndarray:
    """The least key whose score the first pass counts in bin ``bins`` or above (bisection over the finite floats)."""
    below, above = np.full(len(bins), -0x7F800000, np.int64), np.full(len(bins), 0x7F800000, np.int64)  # -inf, inf: never tried
    while (open_ := above - below > 1).any():
        middle = (below + above) // 2
        up = open_ & (_bin_of(_key_value(middle)) >= bins)
        above, below = np.where(up, middle, above), np.where(open_ & ~up, middle, below)
    return above


# ---- pair scores → counts, sampled pairs ---------------------------------------------------------


def _binned_scores(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> Binned:
    """Exact counts: one bin per distinct score."""
    if not (len(scores) == len(same) == len(folds)):
        raise UsageError(f"pairs: {len(scores)} scores, {len(same)} same/different flags, {len(folds)} folds")
    if not np.isfinite(scores).all():
        raise UsageError("pair scores contain NaN or infinite values")
    negated, bins = np.unique(-scores.astype(np.float64), return_inverse=True)
    folds = np.unique(folds, return_inverse=True)[1].reshape(-1)
    size = (folds.max(initial=0) + 1) * len(negated)
    key = folds * len(negated) + bins.reshape(-1)
    positive = np.bincount(key[same], minlength=size).reshape(-1, len(negated))
    negative = np.bincount(key[~same], minlength=size).reshape(-1, len(negated))
    return Binned(-negated, positive, negative)


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


# ---- counts → ROC, AUC, TAR@FAR, EER, accuracy ---------------------------------------------------


def _totals(counts: Binned) -> tuple[np.ndarray, np.ndarray]:
    positive, negative = counts.positive.sum(0), counts.negative.sum(0)
    if positive.sum() == 0 or negative.sum() == 0:
        raise NotApplicable("verification metrics need both positive and negative pairs")
    return positive, negative


def roc_auc_from_counts(counts: Binned) -> float:
    """Area under the ROC curve; a positive and a negative in one bin count as half."""
    positive, negative = (c.astype(np.float64) for c in _totals(counts))
    above = np.cumsum(positive) - positive / 2
    return float((negative * above).sum() / (positive.sum() * negative.sum()))


def roc_curve(counts: Binned) -> Roc:
    """Every ROC point (a threshold at each bin), from (0, 0) to (1, 1)."""
    positive, negative = _totals(counts)
    tpr = np.concatenate([[0.0], np.cumsum(positive) / positive.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(negative) / negative.sum()])
    return Roc(fpr, tpr, np.concatenate([[np.inf], counts.thresholds]))


def thin(roc: Roc) -> Roc:
    """The same curve without the points that lie on a straight line between their neighbours."""
    d_fpr, d_tpr = np.diff(roc.fpr), np.diff(roc.tpr)
    bend = np.abs(d_fpr[1:] * d_tpr[:-1] - d_tpr[1:] * d_fpr[:-1]) > 0
    keep = np.concatenate([[True], bend, [True]])
    return Roc(roc.fpr[keep], roc.tpr[keep], roc.thresholds[keep])


def tar_at(roc: Roc, far: float) -> float:
    """The highest true-accept rate at a threshold whose false-accept rate is at most ``far``."""
    return float(roc.tpr[roc.fpr <= far].max())


def unmeasured(far: float, negatives: int, min_false_accepts: int = RULE_OF_30) -> str | None:
    """Why ``negatives`` negative pairs cannot measure a false-accept rate of ``far``, or None when they can: a rate
    rests on ``min_false_accepts`` false accepts (Doddington's rule of 30: within about ±30 % at 90 % confidence)."""
    if negatives * far >= min_false_accepts:
        return None
    return (
        f"{negatives:,} negative pairs allow {negatives * far:.3g} false accepts at FAR {far:g}, and a measured rate rests on "
        f"{min_false_accepts} or more (Doddington's rule of 30): it takes {math.ceil(min_false_accepts / far):,} negative pairs"
    )


def equal_error(roc: Roc) -> tuple[float, float]:
    """(EER, threshold): where the ROC polyline crosses FPR = 1 - TPR, and the threshold at that point."""
    gap = roc.fpr - (1 - roc.tpr)  # rises from -1 to 1 along the curve
    i = int(np.argmax(gap >= 0))
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(roc.fpr[i - 1] + t * (roc.fpr[i] - roc.fpr[i - 1])), float(roc.thresholds[i])


def cv_accuracy(counts: Binned, balanced: bool = False) -> tuple[float, float, float]:
    """(mean, std, mean threshold) of the accuracy on each fold at the threshold chosen on the others; with ``balanced``,
    of the balanced accuracy (a fold whose pairs, or the others', are not of both kinds is left out)."""
    accuracies, thresholds = [], []
    cut = np.concatenate([[np.inf], counts.thresholds])  # cut j accepts the bins before it
    positive, negative = counts.positive.sum(0), counts.negative.sum(0)
    for f in range(len(counts.positive)):
        test, train = (counts.positive[f], counts.negative[f]), (positive - counts.positive[f], negative - counts.negative[f])
        if not (all(c.sum() for c in test + train) if balanced else test[0].sum() + test[1].sum() and train[0].sum() + train[1].sum()):
            continue
        j = int(np.argmax(_right(*train, balanced)))
        accuracies.append(_right(*test, balanced)[j])
        thresholds.append(cut[j])
    if len(accuracies) < 2:
        raise NotApplicable(f"cross-validated accuracy needs pairs{' of both kinds' if balanced else ''} in at least two folds")
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(thresholds))


def _right(positive: np.ndarray, negative: np.ndarray, balanced: bool) -> np.ndarray:
    """The accuracy when the first j bins are accepted, for j = 0 .. T: the share of pairs classified right, or with
    ``balanced`` the mean of the shares of positives accepted (TAR) and of negatives rejected (TNR)."""
    accepted = np.concatenate([[0], np.cumsum(positive)]).astype(np.float64)
    rejected = negative.sum() - np.concatenate([[0], np.cumsum(negative)]).astype(np.float64)
    p, n = accepted[-1], float(negative.sum())
    if balanced:  # as one fraction: equal accuracies compare equal (exactly, below 2**53 pairs squared)
        return (accepted * n + rejected * p) / (2 * p * n)
    return (accepted + rejected) / (p + n)


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


_VERIFICATION = (roc_auc, tar_at_far, eer, accuracy_10fold)  # these read only pair_counts()
_RETRIEVAL = (recall_at_k, precision_at_k, map_at_r)  # these only neighbours()


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
) -> Results:
    """Every registered metric (or those named in ``metrics``) on the embeddings, plus info.

    ``values`` holds the metrics and ``queries``, ``queries_excluded``, ``pairs``, ``pairs_positive``,
    ``pairs_total``, ``pairs_sampled`` for the work that was done; an approximate ``engine`` adds
    ``index``, its settings (``index_nlist``, ``index_nprobe`` / ``index_m``, ``index_ef_search``) and
    its check against the exact search (``index_check_queries``, ``index_recall@k``,
    ``index_check_recall@1_exact`` and ``_index``). With ``metrics=None`` a metric that does not
    apply (no labels, a set too small for k, say) is left out; a named one raises instead, its name first.
    Only the work the chosen metrics need is done (a plugin's metric may need either kind). ``rerank`` (a re-ranker,
    ``mltk.rerank``) re-orders the neighbour lists first and adds ``rerank_seconds``. A value the data cannot measure
    (a TAR at a FAR too low for the negative pairs: ``min_false_accepts``) is None, and ``not_measured`` says why.
    """
    from mltk import registry

    chosen = registry.list_metrics() if metrics is None else list(metrics)
    functions = {name: registry.get("metrics", name).factory for name in chosen}  # unknown names fail first
    ev = Evaluation(
        embeddings, labels, query=query, gallery=gallery, pairs=pairs, ks=tuple(ks), fars=tuple(fars), folds=folds,
        max_pairs=max_pairs, sample_pairs=sample_pairs, seed=seed, engine=engine, block=block,
        index_options=dict(index_options or {}), check_queries=check_queries, rerank=rerank, min_false_accepts=min_false_accepts,
        retrieval=any(f not in _VERIFICATION for f in functions.values()), verification=any(f not in _RETRIEVAL for f in functions.values()),
    )
    values: dict[str, float] = {}
    left_out: dict[str, str] = {}
    for name, function in functions.items():
        try:
            values.update(function(ev))
        except NotApplicable as exc:
            if metrics is not None:
                raise NotApplicable(f"{name}: {exc}") from None
            left_out[name] = str(exc)
    roc = thin(ev.roc()) if ev.pairs_scored else None
    return Results({**values, **ev.info}, roc, ev, left_out, dict(ev.not_measured))
