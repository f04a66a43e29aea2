"""Re-ranking and query expansion of kNN retrieval lists, in memory linear in the gallery size times k.

The protocol. A re-ranker is any object with an int attribute ``candidates`` (how many of each
query's nearest it wants to see and re-orders; 0: it needs none) that is called on a
``Candidates`` and returns ``(similarities, positions)``, each (nq, K) as the lists it was given,
in the new order (a method that re-orders its first ``candidates`` leaves the rest in place; one
with ``candidates`` 0 re-orders nothing, and a search need not call it). The similarities are always
the plain cosine of the original query to the returned gallery item, never a re-ranking distance, so
a calibrated score threshold keeps its meaning. Each gallery item appears once in a list, and in
leave-one-out (``Candidates.own``) a query's own gallery row never does. ``create`` wraps a plugin's
re-ranker in ``Checked``, which holds it to this.

Built here: ``NoRerank``; ``KReciprocal`` (Zhong et al., CVPR 2017); ``QueryExpansion`` (α-QE of
Radenović et al., TPAMI 2018, and with ``dba=True`` database-side augmentation first, Arandjelović
& Zisserman 2012). Nothing builds an N x N matrix: the gallery's neighbour lists, sets and weights
are sparse, queries go in blocks, and each method checks its memory (``check_memory``) before it
allocates. ``parse_spec`` reads ``NAME[:KEY=VALUE,...]``, the form ``--rerank`` takes.
"""

from __future__ import annotations

import numbers
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import scipy.sparse as sp

from mltk import knn
from mltk.errors import MltkError, UsageError
from mltk.memory import available as available_memory
from mltk.rules import Number, show

BLOCK = 4096  # gallery rows or queries at a time
SCRATCH = 256 << 20  # bytes a block's temporaries may take
SPEC_FORM = "NAME[:KEY=VALUE,...], e.g. k-reciprocal:k1=20,k2=6,lambda=0.3"


class Reranker(Protocol):
    """What ``--rerank`` builds: ``candidates`` (how many nearest it re-orders; 0: none) and a call on ``Candidates``."""

    candidates: int

    def __call__(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(eq=False)
class Candidates:
    """What a re-ranker works on: each query's K nearest gallery items (cosine, best first) and a way to get more lists.

    ``gallery`` may be a memmap: it is read in row blocks. ``own``: leave-one-out, query i is gallery
    row own[i] and not in its own list. ``search(vectors, k) -> (sims, positions)`` searches the
    gallery; None: an exact faiss index of the gallery, built once, when first needed.
    """

    queries: np.ndarray
    gallery: np.ndarray
    similarities: np.ndarray
    positions: np.ndarray
    own: np.ndarray | None = None
    search: Callable | None = None
    _neighbours: tuple | None = field(default=None, init=False, repr=False)
    _index: object = field(default=None, init=False, repr=False)

    def search_gallery(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search``, or the exact index (built on the first call)."""
        if self.search is not None:
            return self.search(vectors, k)
        if self._index is None:
            check_memory(self.gallery.nbytes, f"an exact index of {len(self.gallery):,} gallery images")
            self._index = knn.build(self.gallery)
        return knn.search(self._index, vectors, k)

    def nearest(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k nearest (fewer where the gallery holds fewer): the lists at hand, or a new search when they are shorter."""
        k = min(k, len(self.gallery) - (self.own is not None))
        if k <= self.positions.shape[1]:
            return self.similarities[:, :k], self.positions[:, :k]
        return search_without(self.search_gallery, self.queries, k, self.own)

    def from_lists(self, k: int) -> bool:
        """Whether ``gallery_neighbours(k)`` comes from the lists at hand: leave-one-out, ``own`` covering the gallery, K >= k - 1."""
        own, ng = self.own, len(self.gallery)
        return own is not None and self.positions.shape[1] >= k - 1 and len(own) == ng and np.array_equal(np.sort(own), np.arange(ng))

    def gallery_neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, positions), (ng, k): each gallery row's k nearest gallery rows, itself first; computed once per k (cache the largest, slice).

        In leave-one-out with ``own`` covering every gallery row and K >= k - 1, built from the
        lists at hand (no new search): row own[i] = [own[i]] + positions[i, :k-1].
        """
        ng = len(self.gallery)
        k = min(k, ng)
        if self._neighbours is None or self._neighbours[1].shape[1] < k:
            check_memory(ng * k * 12, f"the {k} nearest of {ng:,} gallery images")
            sims, positions = np.empty((ng, k), np.float32), np.empty((ng, k), np.int64)
            sims[:, 0] = 1.0
            own = self.own
            if self.from_lists(k):
                positions[own, 0] = own
                sims[own, 1:], positions[own, 1:] = self.similarities[:, : k - 1], self.positions[:, : k - 1]
            else:
                positions[:, 0] = np.arange(ng)
                for r0 in range(0, ng, BLOCK):
                    rows = np.arange(r0, min(ng, r0 + BLOCK))
                    vectors = np.ascontiguousarray(self.gallery[r0 : rows[-1] + 1], np.float32)
                    sims[rows, 1:], positions[rows, 1:] = search_without(self.search_gallery, vectors, k - 1, rows)
            self._neighbours = (sims, positions)
        sims, positions = self._neighbours
        return sims[:, :k], positions[:, :k]


def search_without(search: Callable, vectors: np.ndarray, k: int, own: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``search(vectors, k)`` with each vector's own row (own[i]) left out: k + 1 fetched, own (or else the last) dropped."""
    if own is None:
        return search(vectors, k)
    sims, positions = search(vectors, k + 1)
    mine = positions == np.asarray(own)[:, None]
    mine[~mine.any(1), -1] = True
    return sims[~mine].reshape(len(mine), k), positions[~mine].reshape(len(mine), k)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"k-reciprocal:k1=20,lambda=0.3"`` -> ("k-reciprocal", {"k1": 20, "lambda": 0.3}); values are ints, floats or true/false."""
    name, _, rest = spec.partition(":")
    params: dict = {}
    for item in rest.split(",") if rest.strip() else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if not (key and eq and value) or key in params:
            raise UsageError(f"bad re-ranker {spec!r}: {item.strip()!r} is not a new KEY=VALUE; the form is {SPEC_FORM}")
        params[key] = _value(value)
        if params[key] is None:
            raise UsageError(f"bad re-ranker {spec!r}: {value!r} is not a number, true or false; the form is {SPEC_FORM}")
    if not name.strip() or "=" in name or "," in name or (":" in spec and not rest.strip()):
        raise UsageError(f"bad re-ranker {spec!r}: the form is {SPEC_FORM}")
    return name.strip(), params


def create(spec: str | None) -> Checked | None:
    """The re-ranker a spec names ("k-reciprocal:k1=20,k2=6"), built by the plugin that registers it; None for None.

    It comes wrapped in ``Checked``: evaluate and search call every re-ranker through it.
    """
    from mltk import registry

    if spec is None:
        return None
    name, params = parse_spec(spec)
    entry = registry.get("rerankers", name)
    return Checked(entry.name, entry.plugin, lambda: entry.factory(**params))


class Checked:
    """A plugin's re-ranker as evaluate and search call it: what it returns is checked before a metric or a hit reads it.

    A plugin's bug must not pass for a result: positions outside the gallery (-1 would wrap to its last item),
    fewer neighbours than asked, a gallery item listed twice or a query's own row, scores that are not finite
    numbers. Any of these, or an exception it raises, is one MltkError naming the re-ranker and its plugin;
    an MltkError of its own (a lack of memory) goes on as it is.
    """

    def __init__(self, name: str, plugin: str, build: Callable[[], Reranker]):
        self.name, self.plugin = name, plugin
        with self.blamed():
            self.method = build()
            candidates = getattr(self.method, "candidates", None)
        if not callable(self.method):
            raise self.failed(f"its builder returned a {type(self.method).__name__}, not something to call")
        if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 0:
            raise self.failed(f"its candidates (how many nearest it re-orders) is {show(candidates)}, not a whole number from 0")
        self.candidates = int(candidates)

    def __call__(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        with self.blamed():
            out = self.method(c)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
            raise self.failed(f"it returned {got}, not (similarities, positions)")
        with self.blamed():  # a ragged list is no array
            sims, positions = np.asarray(out[0]), np.asarray(out[1])
        self.check(sims, positions, c)
        return sims.astype(np.float32, copy=False), positions.astype(np.int64, copy=False)

    def check(self, sims: np.ndarray, positions: np.ndarray, c: Candidates) -> None:
        """The protocol: both (nq, K) as given, integer positions of distinct gallery rows (never a query's own), finite scores."""
        given, ng = c.positions.shape, len(c.gallery)
        for what, values in (("similarities", sims), ("positions", positions)):
            if values.shape != given:
                raise self.failed(f"it returned {what} of shape {values.shape}; it was given lists of shape {given} and returns lists as long")
        if positions.dtype.kind not in "iu":
            raise self.failed(f"it returned positions of type {positions.dtype}, not whole numbers")
        if sims.dtype.kind not in "fiu":
            raise self.failed(f"it returned similarities of type {sims.dtype}, not numbers")
        outside = (positions < 0) | (positions >= ng)
        if outside.any():
            raise self.failed(f"it returned position {positions[outside][0]}, outside the gallery's {ng} (0 to {ng - 1})")
        ordered = np.sort(positions, axis=1)
        twice = ordered[:, 1:] == ordered[:, :-1]
        if twice.any():
            query, column = np.argwhere(twice)[0]
            raise self.failed(f"it listed gallery item {ordered[query, column]} twice for query {query}")
        mine = positions == np.asarray(c.own)[:, None] if c.own is not None else np.zeros(1, bool)
        if mine.any():
            raise self.failed(f"it listed query {np.argwhere(mine)[0][0]}'s own row (leave-one-out)")
        if not np.isfinite(sims).all():
            raise self.failed(f"it returned the similarity {sims[~np.isfinite(sims)][0]}; a score is a finite cosine")

    def failed(self, why: str) -> MltkError:
        return MltkError(f"re-ranker {self.name!r} (plugin {self.plugin!r}) failed: {why}")

    @contextmanager
    def blamed(self):
        """An exception in the plugin's code becomes ``failed``; mltk's own errors, and Ctrl-C, go on as they are."""
        try:
            yield
        except MltkError:
            raise
        except Exception as exc:
            raise self.failed(f"{type(exc).__name__}: {exc}") from exc


def _value(text: str) -> int | float | bool | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower())


def check_memory(needed_bytes: int, what: str, advice: str = "use --rerank none") -> None:
    """An MltkError, one line, when ``what`` needs more memory than is available (nothing when that is unknown)."""
    available = available_memory()
    if available is not None and needed_bytes > available:
        raise MltkError(f"{what} needs about {_size(needed_bytes)}; {_size(available)} are available: {advice}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _checked(method: str, name: str, value, rule: Number):
    """A parameter by its rule (``mltk.rules``): an int when whole, else a float; a UsageError ``method: NAME must be ...``."""
    if rule.whole and isinstance(value, float) and value.is_integer():  # 20.0, or 1e300 from a spec: a whole number
        value = int(value)
    try:
        value = rule.check(value, name, "")
    except UsageError as exc:
        raise UsageError(f"{method}: {exc}") from None
    return int(value) if rule.whole else float(min(value, sys.float_info.max))  # an int past float's range (1e400 in digits): the largest float


AT_LEAST_1 = Number(1, whole=True)


class NoRerank:
    """The lists as they are."""

    candidates = 0

    def __call__(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        return c.similarities, c.positions


# ---- k-reciprocal re-ranking: the sets, their weights, the Jaccard distance ----


def reciprocal_sets(positions: np.ndarray, k: int) -> sp.csr_matrix:
    """R(g, k) of each row g as a bool CSR (n x n): the h in N(g, k) (g and its k nearest) that have g in N(h, k).

    ``positions`` (n, >= k+1): each row's nearest, itself first. g is in its own set.
    """
    n, w = len(positions), min(k + 1, positions.shape[1])
    near = positions[:, :w]
    keep = np.empty((n, w), bool)
    for r0 in range(0, n, BLOCK):
        rows = near[r0 : r0 + BLOCK]
        keep[r0 : r0 + len(rows)] = (near[rows] == np.arange(r0, r0 + len(rows))[:, None, None]).any(-1)
    return _csr(keep.sum(1), near[keep], n)


def expanded_sets(positions: np.ndarray, k1: int) -> sp.csr_matrix:
    """R*(g) of each row as a bool CSR: R(g, k1) plus R(q, round(k1/2)) of each q in it sharing more than 2/3 of that set with R(g, k1)."""
    n = len(positions)
    first = _padded(reciprocal_sets(positions, k1))
    half = _padded(reciprocal_sets(positions, half_of(k1)))
    counts, cols = [], []
    for r0 in range(0, n, BLOCK):
        c, i = _expand(first[r0 : r0 + BLOCK], half)
        counts.append(c)
        cols.append(i)
    return _csr(np.concatenate(counts), np.concatenate(cols), n)


def half_of(k1: int) -> int:
    """round(k1 / 2) as the original rounds it (numpy's: halves to even), in whole numbers (k1 may pass any float)."""
    half, odd = divmod(k1, 2)
    return half + (odd and half % 2)


def _expand(sets: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of R(., k1) (padded with -1) expanded by the 2/3 rule with the R(., k1/2) rows ``half``: (counts, sorted columns)."""
    theirs = np.where(sets[..., None] >= 0, half[sets], -1)  # (b, w1, w2): R(q, k1/2) of each member q
    size = (theirs >= 0).sum(-1)
    shared = ((theirs[..., None] == sets[:, None, None, :]) & (theirs[..., None] >= 0)).any(-1).sum(-1)
    accept = (sets >= 0) & (3 * shared > 2 * size)  # |R(q,k1/2) ∩ R(g,k1)| > 2/3 |R(q,k1/2)|
    merged = np.concatenate([sets, np.where(accept[..., None], theirs, -1).reshape(len(sets), -1)], 1)
    merged.sort(1)
    keep = merged >= 0
    keep[:, 1:] &= merged[:, 1:] != merged[:, :-1]
    return keep.sum(1), merged[keep]


def _csr(counts: np.ndarray, cols: np.ndarray, n: int, data: np.ndarray | None = None) -> sp.csr_matrix:
    indptr = np.concatenate([[0], np.cumsum(counts)])
    index = np.int32 if max(n, len(cols)) < 2**31 else np.int64
    data = np.ones(len(cols), bool) if data is None else data
    m = sp.csr_matrix((data, cols.astype(index), indptr.astype(index)), shape=(len(counts), n))
    m.sort_indices()
    return m


def _padded(sets: sp.csr_matrix) -> np.ndarray:
    """A CSR's rows as an (n, widest) array of columns, padded with -1."""
    counts = np.diff(sets.indptr)
    out = np.full((sets.shape[0], max(1, counts.max(initial=0))), -1, np.int64)
    out[np.arange(out.shape[1]) < counts[:, None]] = sets.indices
    return out


def reciprocal_features(sets: sp.csr_matrix, gallery: np.ndarray) -> sp.csr_matrix:
    """V (float32 CSR): row g spreads exp(-d(g, h)) over the h of its set, normalised to sum 1; d = (1 - cos) / 2."""
    n = sets.shape[0]
    data = np.empty(sets.nnz, np.float32)
    for r0 in range(0, n, BLOCK):
        r1 = min(n, r0 + BLOCK)
        a, b = sets.indptr[r0], sets.indptr[r1]
        local = np.repeat(np.arange(r1 - r0), np.diff(sets.indptr[r0 : r1 + 1]))
        sims = _pair_cosines(np.asarray(gallery[r0:r1], np.float32), local, gallery, sets.indices[a:b])
        data[a:b] = _normalised(np.exp(-(1.0 - sims) / 2), local, r1 - r0)
    return sp.csr_matrix((data, sets.indices, sets.indptr), shape=sets.shape)


def _normalised(weights: np.ndarray, rows: np.ndarray, n: int, extra: float = 0.0) -> np.ndarray:
    """Each row's weights over their sum (plus ``extra``: a weight that is not a column)."""
    return (weights / (np.bincount(rows, weights, minlength=n) + extra)[rows]).astype(np.float32)


def _pair_cosines(vectors: np.ndarray, rows: np.ndarray, gallery: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """cos(vectors[rows[i]], gallery[cols[i]]) for each pair; gallery rows gathered a chunk at a time."""
    out = np.empty(len(cols), np.float64)
    step = max(1, SCRATCH // (16 * gallery.shape[1]))
    for s in range(0, len(cols), step):
        unique, back = np.unique(cols[s : s + step], return_inverse=True)
        found = np.asarray(gallery[unique], np.float32)[back]
        out[s : s + step] = np.einsum("ij,ij->i", vectors[rows[s : s + step]], found, dtype=np.float64)
    return out


def local_expansion(features: sp.csr_matrix, positions: np.ndarray, k2: int, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """V^qe: each row's mean of V over N(g, k2 - 1) (its k2 nearest, itself first); only ``rows`` (all when None) filled."""
    n, w = features.shape[0], min(k2, positions.shape[1])
    rows = np.arange(n) if rows is None else np.unique(rows)
    counts = np.zeros(n, np.int64)
    counts[rows] = w
    mean = _csr(counts, positions[rows, :w].ravel(), n, np.full(len(rows) * w, 1 / w, np.float32))
    return (mean @ features).tocsr()


def _jaccard(mine: sp.csr_matrix, theirs: sp.csr_matrix) -> np.ndarray:
    """1 - Σ min / Σ max of rows that each sum to 1 (so Σ max = 2 - Σ min), row by row."""
    shared = np.asarray(mine.minimum(theirs).sum(1, dtype=np.float64)).ravel()
    return 1.0 - shared / (2.0 - shared)


class KReciprocal:
    """k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017).

    Over U = gallery ∪ {query p}, d = (1 - cos) / 2. R(x, k): the x among N(x, k) (x and its k
    nearest) that have x in their N(., k); R*(x) adds R(q, k1/2) of q in R(x, k1) sharing more than
    2/3 of it; V_x: exp(-d(x, .)) on R*(x), summing to 1; V^qe_x: the mean of V over x's k2 nearest
    (x included). The distance is (1 - λ) (1 - Σmin(V^qe_p, V^qe_g) / Σmax(...)) + λ d(p, g).

    Where this differs from the reference code (zhunzhong07/person-re-ranking ``re_ranking``), and why:
    the gallery's neighbour lists, sets and weights are computed among the gallery alone, once, so a
    query's result never depends on which other queries are searched with it, and the cost is
    linear in the gallery (the original ranks probes and gallery together, N x N). A query outside
    the gallery is k-reciprocal with h when it would enter h's k1 nearest (it beats h's k1-th
    gallery neighbour); it is not added to the gallery's own sets. Only each query's first
    ``candidates`` are re-ranked (the rest keep their place); d is (1 - cos) / 2 rather than the
    squared distance over its column maximum. In leave-one-out with every gallery row a query
    (the original's setting) the order is the original's.
    """

    def __init__(self, k1: int = 20, k2: int = 6, lam: float = 0.3, candidates: int = 100):
        self.k1 = _checked("k-reciprocal", "k1", k1, AT_LEAST_1)
        self.k2 = _checked("k-reciprocal", "k2", k2, Number(1, self.k1 + 1, whole=True, what=f"an integer from 1 to k1+1 (k1={show(self.k1)})"))
        self.lam = _checked("k-reciprocal", "lambda", lam, Number(0, 1, strings=False))
        self.candidates = _checked("k-reciprocal", "candidates", candidates, AT_LEAST_1)

    def memory(self, c: Candidates) -> int:
        """Bytes it will need, about ng (k1+1) (32 + 16 (1 + k2)) + nq k1 12 + a block's scratch (+ the gallery, to index it).

        Each list is as long as the gallery allows: a k1 or k2 beyond it counts as the gallery's size, as in the call.
        """
        ng, nq = len(c.gallery), len(c.queries)
        w1, w2 = min(self.k1 + 1, ng), min(half_of(self.k1) + 1, ng)  # a gallery row's lists: itself and its k1 (k1/2) nearest
        k1, k2 = w1 - 1, min(self.k2, w1)
        expanded = 2 * w1  # a typical R*: R(g, k1) and as much again from the 2/3 rule
        gallery = ng * (w1 * 12 + (w1 + w2) * 13 + expanded * 8 * (1 + k2))  # lists, sets (and their padded copies), V and V^qe
        searched = c._index is None and c.search is None and not (c.from_lists(w1) and c.positions.shape[1] >= k1)
        return gallery + nq * min(self.k1, ng) * 12 + SCRATCH + (c.gallery.nbytes if searched else 0)

    def __call__(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        ng, kr = len(c.gallery), min(c.positions.shape[1], self.candidates)
        if kr < 2:
            return c.similarities, c.positions
        what, advice = f"k-reciprocal re-ranking of {ng:,} gallery images", "lower k1 or use --rerank none"
        check_memory(self.memory(c), what, advice)
        # The gallery among itself: neighbours, R*, V
        gsims, gpos = c.gallery_neighbours(self.k1 + 1)
        features = reciprocal_features(expanded_sets(gpos, self.k1), c.gallery)
        # V^qe of the gallery rows some query will meet (its exact size is known now)
        sims, positions = c.similarities[:, :kr], c.positions[:, :kr]
        rows = np.unique(positions) if c.own is None else np.union1d(positions, c.own)
        row_nnz = np.diff(features.indptr)
        check_memory(int(row_nnz[gpos[rows, : self.k2]].sum()) * 16, what, advice)
        expanded = local_expansion(features, gpos, self.k2, rows)
        if c.own is None:  # queries outside the gallery: their k1 nearest, and h's bar to let p into N(h, k1)
            qsims, qpos = c.nearest(self.k1)
            bar = gsims[:, self.k1] if gsims.shape[1] > self.k1 else np.full(ng, -np.inf, np.float32)
            half = _padded(reciprocal_sets(gpos, half_of(self.k1)))
        # Queries in blocks: their V^qe, the Jaccard distance to each candidate, the new order
        per_row = 48 * max(1, expanded.nnz // max(1, len(rows)))
        block = max(1, min(BLOCK, SCRATCH // (kr * per_row)))
        out_s, out_p = c.similarities.copy(), c.positions.copy()
        for r0 in range(0, len(positions), block):
            b = slice(r0, r0 + block)
            if c.own is None:
                mine = _query_features(c.queries[b], qsims[b], qpos[b], bar, half, features, c.gallery, self.k2)
            else:
                mine = expanded[c.own[b]]
            n = len(positions[b])
            jaccard = _jaccard(mine[np.repeat(np.arange(n), kr)], expanded[positions[b].ravel()]).reshape(n, kr)
            distance = (1 - self.lam) * jaccard + self.lam * (1.0 - sims[b]) / 2
            order = np.argsort(distance, axis=1, kind="stable")
            out_s[b, :kr], out_p[b, :kr] = np.take_along_axis(sims[b], order, 1), np.take_along_axis(positions[b], order, 1)
        return out_s, out_p


def _query_features(queries, qsims, qpos, bar, half, features, gallery, k2) -> sp.csr_matrix:
    """V^qe of queries outside the gallery, over the gallery's columns (p's own weight counts in the sums, it is no column)."""
    n = len(queries)
    mine = np.where(qsims >= bar[qpos], qpos, -1)  # R(p, k1) in the gallery: p would enter h's k1 nearest
    counts, cols = _expand(mine, half)
    local = np.repeat(np.arange(n), counts)
    cos = _pair_cosines(np.asarray(queries, np.float32), local, gallery, cols)
    own = _csr(counts, cols, features.shape[1], _normalised(np.exp(-(1.0 - cos) / 2), local, n, extra=1.0))  # exp(-d(p,p)) = 1
    w = min(k2 - 1, qpos.shape[1])
    mean = _csr(np.full(n, w), qpos[:, :w].ravel(), features.shape[0], np.ones(n * w, np.float32))
    return ((own + mean @ features) / (w + 1)).tocsr()


# ---- query expansion ----


def expand(vectors: np.ndarray, sims: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """α-weighted expansion of each row: normalise(v + Σ_i max(s_i, 0)^α n_i); ``sims`` (m, n), ``neighbours`` (m, n, d)."""
    weights = np.maximum(np.asarray(sims, np.float64), 0.0) ** alpha
    out = vectors + np.einsum("mn,mnd->md", weights, neighbours)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.where(norm > 0, norm, 1), vectors).astype(np.float32)


def augmented_index(c: Candidates, n: int, alpha: float):
    """Database-side augmentation: an exact inner-product faiss index of each gallery row expanded by its n nearest other rows."""
    import faiss

    ng, dim = c.gallery.shape
    sims, positions = c.gallery_neighbours(n + 1)
    index = faiss.IndexFlatIP(dim)
    step = max(1, SCRATCH // (4 * dim * (n + 1)))
    for r0 in range(0, ng, step):
        around = _rows(c.gallery, positions[r0 : r0 + step, 1:])
        index.add(expand(np.asarray(c.gallery[r0 : r0 + step], np.float32), sims[r0 : r0 + step, 1:], around, alpha))
    return index


class QueryExpansion:
    """α-QE: each query becomes normalise(q + Σ s_i^α g_i) over its n nearest, then is searched again for K results.

    With ``dba``, the gallery is first augmented the same way (each row by its n nearest other
    rows), and the query is expanded by, and searched among, the augmented rows (as DBA + αQE is
    usually run). The similarities returned are the original query's cosine to the original rows.
    """

    def __init__(self, n: int = 3, alpha: float = 3.0, dba: bool = False):
        name = "dba" if dba else "qe"
        self.n = self.candidates = _checked(name, "n", n, AT_LEAST_1)
        self.alpha, self.dba = _checked(name, "alpha", alpha, Number(0, strings=False)), bool(dba)

    def memory(self, c: Candidates) -> int:
        """Bytes it will need, about: the gallery's exact index (unless ``search`` is given), DBA's index and lists, a block's scratch."""
        indexed = c._index is None and c.search is None and not (self.dba and c.from_lists(self.n + 1))
        dba = c.gallery.nbytes + len(c.gallery) * min(self.n + 1, len(c.gallery)) * 12 if self.dba else 0  # n beyond the gallery: all of it
        return (c.gallery.nbytes if indexed else 0) + dba + SCRATCH

    def __call__(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        ng, dim = c.gallery.shape
        k, n = min(c.positions.shape[1], ng - (c.own is not None)), min(self.n, ng)  # n beyond the gallery: all of it
        if k < 1:
            return c.similarities, c.positions
        check_memory(self.memory(c), f"{'dba' if self.dba else 'qe'} over {ng:,} gallery images", "use --rerank none")
        if self.dba:
            index = augmented_index(c, n, self.alpha)
            search = lambda vectors, kk: knn.search(index, vectors, kk)  # noqa: E731
            first = search_without(search, c.queries, min(n, k), c.own)
        else:
            search, first = c.search_gallery, c.nearest(n)
        step = max(1, SCRATCH // (4 * dim * (max(n, k) + 1)))
        out_s, out_p = np.empty((len(c.queries), k), np.float32), np.empty((len(c.queries), k), np.int64)
        for r0 in range(0, len(c.queries), step):
            b = slice(r0, r0 + step)
            query = np.asarray(c.queries[b], np.float32)
            s, p = first[0][b], first[1][b]
            around = index.reconstruct_batch(p.ravel()).reshape(*p.shape, dim) if self.dba else _rows(c.gallery, p)
            _, positions = search_without(search, expand(query, s, around, self.alpha), k, None if c.own is None else c.own[b])
            out_p[b] = positions
            out_s[b] = np.einsum("md,mkd->mk", query, _rows(c.gallery, positions))
        return out_s, out_p


def _rows(gallery: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """gallery[positions] as float32, each distinct row read once (in order, for a memmap)."""
    unique, back = np.unique(positions, return_inverse=True)
    return np.asarray(gallery[unique], np.float32)[back.reshape(positions.shape)]
