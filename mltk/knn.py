"""Nearest-neighbour search with faiss over L2-normalised embeddings (cosine similarity = inner product).

One vocabulary of index kinds serves ``mltk evaluate --index``, ``mltk index --kind`` and the library
(``KINDS``): "flat" is exact (IndexFlatIP); "ivf" (IndexIVFFlat) puts the vectors in ``nlist`` k-means
cells (about 4·sqrt(N)) and a query visits the ``nprobe`` nearest cells; "ivfpq" (IndexIVFPQ) does
the same but keeps each vector as ``pq_m`` one-byte codes (product quantization of its residual),
so 10 million vectors of 8192 dimensions take 640 MB instead of 320 GiB, and its scores are
approximations of the cosine; "hnsw" (IndexHNSWFlat) walks a graph of ``m`` links per vector,
keeping ``ef_search`` candidates. The approximate kinds trade some of the true nearest neighbours
for speed (and ivfpq for memory) on galleries in the millions; flat, ivf and hnsw keep the float32
vectors in memory. ``check`` measures what an approximate search found against the exact one.

Indexes are built and stored in their CPU form. A search runs on every GPU faiss sees, the vectors
sharded across them (flat, ivf, ivfpq; HNSW has no GPU form, and faiss's GPU search takes k <= 2048); the copy on the
GPUs is kept with the index for its next search, and an index faiss cannot copy there is searched on the CPU with a warning. Vectors are added in chunks
and queries searched in blocks, so a float32 ``np.memmap`` is read, never copied whole. A search
returns k results for every query whenever the index holds k vectors: a query an approximate
search leaves short is searched again exactly.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Callable

import numpy as np

from mltk.errors import UsageError, first_line

#: each index kind, and the options of ``mltk index`` it takes (``build`` takes them)
OPTIONS = {"flat": (), "ivf": ("nlist", "nprobe"), "ivfpq": ("nlist", "nprobe", "pq_m"), "hnsw": ("m", "ef_search")}
KINDS = tuple(OPTIONS)
APPROXIMATE = ("ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
GPU_MAX_K = 2048  # faiss's GPU search: k and nprobe at most this
CHUNK = 65536  # vectors added to an index at a time
BLOCK = 4096  # queries searched at a time
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
PQ_BITS = 8  # each code is a byte: 256 centroids per sub-vector, trained on at least 256 vectors
Progress = Callable[[str, int, int], None]  # (phase, done, total)


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) cells, but at least 39 vectors a cell to train on (faiss's minimum)."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def default_nprobe(nlist: int) -> int:
    """Cells a query visits: an eighth of them, at least 16 (all of a small index)."""
    return min(nlist, max(16, nlist // 8))


def default_pq_m(dim: int) -> int:
    """Bytes per vector for ivfpq: 64 where it divides the dimension (the largest divisor up to 64 otherwise)."""
    return max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)


def build(
    vectors: np.ndarray,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
    seed: int = 0,
    progress: Progress | None = None,
):
    """An index of ``vectors`` (an array or a memmap, N x dim, L2-normalised); position i is row i.

    ivf: ``nlist`` cells (default ``default_nlist``), trained on a seeded sample, ``nprobe`` visited
    (default ``default_nprobe``); ivfpq: the same, with ``pq_m`` bytes per vector (it divides the
    dimension; default ``default_pq_m``); hnsw: ``m`` links per vector, ``ef_construction`` and ``ef_search``
    candidates while building and searching.
    """
    import faiss

    n, dim = vectors.shape
    check_options(kind, n, dim, nlist=nlist, nprobe=nprobe, pq_m=pq_m, m=m, ef_construction=ef_construction, ef_search=ef_search)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
    else:
        nlist = default_nlist(n) if nlist is None else nlist
        if kind == "ivfpq":
            pq_m = default_pq_m(dim) if pq_m is None else pq_m
            index = faiss.IndexIVFPQ(_centroids(vectors, nlist, seed), dim, nlist, pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
            index.train(_sample(vectors, max(training_rows(nlist, dim), 64 * 2**PQ_BITS), seed))  # the codebooks; the cells are trained
        else:
            index = faiss.IndexIVFFlat(_centroids(vectors, nlist, seed), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nlist, default_nprobe(nlist) if nprobe is None else nprobe)
    for s in range(0, n, CHUNK):
        index.add(np.ascontiguousarray(vectors[s : s + CHUNK], np.float32))
        if progress:
            progress("indexing", min(s + CHUNK, n), n)
    return index


def check_options(
    kind: str, n: int | None = None, dim: int | None = None, *, nlist: int | None = None, nprobe: int | None = None,
    pq_m: int | None = None, m: int | None = None, ef_construction: int | None = None, ef_search: int | None = None, seed: int = 0,
) -> None:
    """The options ``build`` takes, for ``n`` vectors of ``dim`` dimensions: checked before anything is embedded.

    Without ``n`` and ``dim`` (the model and data not loaded yet), what does not depend on them.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n == 0:
        raise UsageError("nothing to index: no vectors")
    for name, value, least in (("nlist", nlist, 1), ("nprobe", nprobe, 1), ("pq_m", pq_m, 1), ("m", m, 2), ("ef_construction", ef_construction, 1), ("ef_search", ef_search, 1)):
        if value is not None and value < least:
            raise UsageError(f"{name}={value}: it is at least {least}")
    if kind in IVF_KINDS and n is not None and nlist is not None and nlist > n:
        raise UsageError(f"nlist={nlist}: an IVF index of {n} vectors takes 1 to {n} cells")
    if kind == "ivfpq" and dim is not None and pq_m is not None and dim % pq_m:
        raise UsageError(f"pq_m={pq_m}: it must divide the {dim} dimensions (e.g. {default_pq_m(dim)})")
    if kind == "ivfpq" and n is not None and n < 2**PQ_BITS:
        raise UsageError(f"an ivfpq index trains 256 codes per sub-vector and needs at least 256 vectors; {n} given: use ivf or flat")


def _centroids(vectors, nlist: int, seed: int):
    """A quantizer holding ``nlist`` spherical k-means centroids of a seeded sample (on the GPUs when there are any)."""
    import faiss

    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    if nlist == 1:  # one cell holds everything: nothing to train
        quantizer.add(np.eye(1, vectors.shape[1], dtype=np.float32))
        return quantizer
    points = _sample(vectors, training_rows(nlist, vectors.shape[1]), seed)
    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=20, seed=seed, spherical=True, gpu=faiss.get_num_gpus() > 0)
    kmeans.train(points)
    quantizer.add(kmeans.centroids)
    return quantizer


def training_rows(nlist: int, dim: int) -> int:
    """Rows to train ``nlist`` cells on: 64 a cell, fewer (down to faiss's 39) where that would pass 4 GiB of float32."""
    return max(39 * nlist, min(64 * nlist, (4 << 30) // (4 * dim)))


def _sample(vectors, size: int, seed: int) -> np.ndarray:
    """Up to ``size`` rows, drawn without replacement (seeded), in order: a memmap is read only there."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(len(vectors), size), replace=False))
    return np.ascontiguousarray(vectors[rows], np.float32)


def kind_of(index) -> str:
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat"


def configure(index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set the search-time settings: the cells an IVF query visits, the candidates an HNSW query keeps."""
    import faiss

    kind = kind_of(index)
    for name, value, applies in (("nprobe", nprobe, IVF_KINDS), ("ef_search", ef_search, ("hnsw",))):
        if value is not None and kind not in applies:
            raise UsageError(f"{name} applies to an {' or '.join(applies)} index (this index: {kind})")
        if value is not None and value < 1:
            raise UsageError(f"{name}={value}: it is at least 1")
    if nprobe is not None:
        faiss.downcast_index(index).nprobe = min(nprobe, faiss.downcast_index(index).nlist)
    if ef_search is not None:
        faiss.downcast_index(index).hnsw.efSearch = ef_search


def settings(index) -> dict[str, int]:
    """The index's parameters: nlist and nprobe (ivf), m and ef_search (hnsw)."""
    import faiss

    index, kind = faiss.downcast_index(index), kind_of(index)
    if kind == "ivf":
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if kind == "ivfpq":
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe), "pq_m": int(index.pq.M)}
    if kind == "hnsw":
        return {"m": int(index.hnsw.nb_neighbors(1)), "ef_search": int(index.hnsw.efSearch)}
    return {}


def search(index, queries: np.ndarray, k: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, positions), each (len(queries), k), best first; queries in blocks, on the GPUs when possible."""
    import faiss

    if not 1 <= k <= index.ntotal:
        raise UsageError(f"k={k} is more than the {index.ntotal} vectors in the index" if k > 0 else f"k={k}: k is at least 1")
    kind, cpu = kind_of(index), faiss.downcast_index(index)
    params = faiss.SearchParametersHNSW(efSearch=max(cpu.hnsw.efSearch, k)) if kind == "hnsw" else None
    device = _on_gpus(index, kind, k)
    sims, positions = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for r0 in range(0, len(queries), block):
        q = np.ascontiguousarray(queries[r0 : r0 + block], np.float32)
        s, p = _search(cpu, q, k, params) if device is index else _search(device, q, k)
        short = np.flatnonzero((p < 0).any(1))
        if len(short):  # fewer than k found (cells too small, a graph walk cut short): search those exactly
            s[short], p[short] = _exact_search(cpu, kind, q[short], k)
        sims[r0 : r0 + len(q)], positions[r0 : r0 + len(q)] = s, p
    return sims, positions


#: each index's copy on the GPUs (None where faiss refused the copy), with what it was copied with:
#: a copy of a large gallery takes seconds, so it is made once and dropped with the index
_ON_GPUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_gpus(index, kind: str, k: int):
    """The index on every GPU faiss sees, or the index itself (no GPU, HNSW, or past faiss's GPU limits).

    The copy is kept for the next search of the same index; it is made again once vectors are added or nprobe changes."""
    import faiss

    cpu = faiss.downcast_index(index)
    gpus = faiss.get_num_gpus()
    if gpus == 0 or kind == "hnsw" or k > GPU_MAX_K or (kind in IVF_KINDS and cpu.nprobe > GPU_MAX_K):
        return index
    copied_with = (gpus, index.ntotal, cpu.nprobe if kind in IVF_KINDS else None)
    known = _ON_GPUS.get(index)
    if known is not None and known[0] == copied_with:
        return index if known[1] is None else known[1]
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the vectors (not a copy of all): n GPUs hold an n times larger gallery
    options.useFloat16LookupTables = kind == "ivfpq"  # faiss's GPU IVF-PQ needs them past 48 bytes per vector
    try:
        device = faiss.index_cpu_to_all_gpus(cpu, co=options)  # copies nprobe with the vectors
    except RuntimeError as exc:  # a form faiss's GPU code does not take (e.g. some pq_m): search on the CPU, and say so once
        warnings.warn(f"faiss cannot search this {kind} index on the GPU ({first_line(exc)[:200]}); it is searched on the CPU", stacklevel=3)
        device = index
    _ON_GPUS[index] = (copied_with, None if device is index else device)  # None: the entry must not keep the index alive
    return device


def _exact_search(index, kind: str, queries: np.ndarray, k: int):
    import faiss

    if kind in IVF_KINDS:  # visiting every cell: exact for ivf; for ivfpq, as close as its codes allow
        return _search(index, queries, k, faiss.SearchParametersIVF(nprobe=index.nlist))
    if kind == "hnsw":
        return _search(faiss.downcast_index(index.storage), queries, k)
    return _search(index, queries, k)


def _search(index, queries: np.ndarray, k: int, params=None):
    # faiss.contrib.torch_utils (pytorch-metric-learning imports it) replaces ``search`` with a
    # version without ``params``; faiss's own numpy search is kept as ``search_numpy``.
    return getattr(index, "search_numpy", index.search)(queries, k, params=params)


def neighbours(index, queries: np.ndarray, k: int, own: np.ndarray | None = None, gallery: np.ndarray | None = None, block: int = BLOCK):
    """(similarities, positions) of the k nearest indexed vectors of each query, ties broken by the lower position.

    ``own``: each query's own position in the index (leave-one-out), left out of its results.
    faiss orders tied results arbitrarily, so one more neighbour than needed is fetched and the
    results are sorted by (-similarity, position). With ``gallery`` (the indexed vectors, for an
    exact index), a query whose k-th and (k+1)-th results tie is ranked again over the whole
    gallery with a stable sort: the order is then exactly that of a stable sort of -similarity.
    """
    fetch = min(k + 1 + (own is not None), index.ntotal)
    found_s, found_p = search(index, queries, fetch, block)
    sims, positions = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for r0 in range(0, len(queries), block):
        s, p = found_s[r0 : r0 + block], found_p[r0 : r0 + block]
        if own is not None:  # drop the query itself, or the last result where the query was not returned
            mine = p == own[r0 : r0 + len(p), None]
            mine[~mine.any(1), -1] = True
            s, p = s[~mine].reshape(len(p), -1), p[~mine].reshape(len(p), -1)
        order = np.lexsort((p, -s), axis=1)
        s, p = np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)
        for row in np.flatnonzero(s[:, k - 1] == s[:, k]) if gallery is not None and s.shape[1] > k else ():
            s[row, :k], p[row, :k] = _stable_row(np.asarray(queries[r0 + row], np.float32), gallery, None if own is None else own[r0 + row], k)
        sims[r0 : r0 + len(s)], positions[r0 : r0 + len(s)] = s[:, :k], p[:, :k]
    return sims, positions


def _stable_row(query: np.ndarray, gallery: np.ndarray, own: int | None, k: int):
    s = gallery @ query
    if own is not None:
        s[own] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    return s[order], order


def exact_neighbours(queries: np.ndarray, gallery: np.ndarray, k: int, own: np.ndarray | None = None, chunk: int | None = None):
    """Brute force, without faiss: the k nearest gallery rows of each query in stable-sort order.

    The gallery is read ``chunk`` rows at a time (by default as many as keep a block of
    similarities to 32 MB), once: a memmap is never copied whole. Meant for a sample of queries,
    such as the check of an approximate index against the exact search.
    """
    q = np.ascontiguousarray(queries, np.float32)
    chunk = chunk or max(1024, (1 << 23) // max(1, len(q)))
    best_s, best_p = np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64)
    for c0 in range(0, len(gallery), chunk):
        s = q @ np.asarray(gallery[c0 : c0 + chunk], np.float32).T
        if own is not None:
            mine = np.flatnonzero((own >= c0) & (own < c0 + s.shape[1]))
            s[mine, own[mine] - c0] = -np.inf
        s, p = _stable_top(s, min(k, s.shape[1]))
        s, p = np.concatenate([best_s, s], 1), np.concatenate([best_p, p + c0], 1)
        order = np.lexsort((p, -s), axis=1)[:, :k]
        best_s, best_p = np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)
    return best_s, best_p


def _stable_top(s: np.ndarray, k: int):
    """The k largest of each row, the lower column first among equals (a partition, then a sort of the few left)."""
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
    r, c = np.nonzero(s >= kth)
    v = s[r, c]
    order = np.lexsort((c, -v, r))
    r, c, v = r[order], c[order], v[order]
    keep = np.arange(len(r)) - np.searchsorted(r, r) < k  # rank within its row
    return v[keep].reshape(-1, k), c[keep].reshape(-1, k)


def check(found: np.ndarray, queries, gallery, ks, own: np.ndarray | None = None, size: int = 1000, seed: int = 0):
    """An index's neighbours (``found``: positions, a row per query) against the exact search on a seeded sample.

    Returns the sampled query rows, their exact neighbours (positions) and ``index_recall@k`` for
    each k in ``ks``: the share of the exact k nearest that the index found among its first k.
    """
    sample = np.arange(len(queries))
    if len(queries) > size:
        sample = np.sort(np.random.default_rng(seed).choice(len(queries), size, replace=False))
    k = min(max(ks), found.shape[1])
    _, exact = exact_neighbours(queries[sample], gallery, k, own=None if own is None else own[sample])
    return sample, exact, {f"index_recall@{kk}": overlap(found[sample], exact, kk) for kk in sorted(set(ks)) if kk <= k}


def overlap(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact k nearest (rows of ``exact``) that are among the first k ``found``."""
    hits = (found[:, :k, None] == exact[:, None, :k]).any(1)
    return float(hits.mean())
