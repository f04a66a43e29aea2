"""Faiss indexes over L2-normalised embeddings (cosine similarity = inner product), and index directories.

Kinds: "flat" is exact (IndexFlatIP); "ivf" (IndexIVFFlat) puts the vectors in ``nlist`` k-means
cells (about 4·sqrt(N)) and a query visits the ``nprobe`` nearest cells; "ivfpq" (IndexIVFPQ) does
the same but keeps each vector as ``pq_m`` one-byte codes (product quantization of its residual),
so 10 million vectors of 8192 dimensions take 640 MB instead of 320 GiB, and its scores are
approximations of the cosine; "hnsw" (IndexHNSWFlat) walks a graph of ``m`` links per vector,
keeping ``ef_search`` candidates. The approximate kinds trade some of the true nearest neighbours
for speed (and ivfpq for memory) on galleries in the millions; flat, ivf and hnsw keep the float32
vectors in memory.

Indexes are built and stored in their CPU form. A search runs on every GPU faiss sees, the vectors
sharded across them (flat, ivf, ivfpq; HNSW has no GPU form, and faiss's GPU search takes k <= 2048). Vectors are added in chunks
and queries searched in blocks, so a float32 ``np.memmap`` is read, never copied whole. A search
returns k results for every query whenever the index holds k vectors: a query an approximate
search leaves short is searched again exactly.

``mltk index`` writes an index directory, self-contained: the index, the vectors, the image paths
and labels, and the model that embeds queries (see ``write_index_dir``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import reprlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mltk.errors import MltkError, UsageError
from mltk.outputs import aside, check_dir, disk_error, stale_temporaries, temporary

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
GPU_MAX_K = 2048  # faiss's GPU search: k and nprobe at most this
CHUNK = 65536  # vectors added to an index at a time
BLOCK = 4096  # queries searched at a time
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
PQ_BITS = 8  # each code is a byte: 256 centroids per sub-vector, trained on at least 256 vectors
FORMAT = "mltk-index-1"
Progress = Callable[[str, int, int], None]  # (phase, done, total)


# ---- build and search ----------------------------------------------------------------------------


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
    device = _on_gpus(cpu, kind, k)
    sims, positions = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    for r0 in range(0, len(queries), block):
        q = np.ascontiguousarray(queries[r0 : r0 + block], np.float32)
        s, p = _search(cpu, q, k, params) if device is cpu else _search(device, q, k)
        short = np.flatnonzero((p < 0).any(1))
        if len(short):  # fewer than k found (cells too small, a graph walk cut short): search those exactly
            s[short], p[short] = _exact_search(cpu, kind, q[short], k)
        sims[r0 : r0 + len(q)], positions[r0 : r0 + len(q)] = s, p
    return sims, positions


def _on_gpus(index, kind: str, k: int):
    """The index on every GPU faiss sees, or the index itself (no GPU, HNSW, or past faiss's GPU limits)."""
    import faiss

    if faiss.get_num_gpus() == 0 or kind == "hnsw" or k > GPU_MAX_K or (kind in IVF_KINDS and index.nprobe > GPU_MAX_K):
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the vectors (not a copy of all): n GPUs hold an n times larger gallery
    options.useFloat16LookupTables = kind == "ivfpq"  # faiss's GPU IVF-PQ needs them past 48 bytes per vector
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)  # copies nprobe with the vectors
    except RuntimeError:  # a form faiss's GPU code does not take (e.g. some pq_m): search on the CPU
        return index


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


# ---- index directories ---------------------------------------------------------------------------

# Everything ``write_index_dir`` puts in an index directory: a folder holding anything else is not
# only an index, and replacing it (a removal of the whole folder) would take the rest with it.
WRITTEN = ("index.faiss", "embeddings.npy", "paths.txt", "labels.npy", "classes.json", "model.pt", "meta.json", "skipped_images.txt")
META_MAX = 1 << 20  # meta.json holds a few hundred bytes: a larger file of that name is not one
META_FIELDS = {"kind": str, "metric": str, "dim": int, "count": int, "params": dict}  # what a search relies on
META_TEXT = ("run", "data", "mltk_version", "faiss_version", "torch_version", "created")  # strings when present


@dataclass
class IndexDir:
    """An index directory, opened: the faiss index, what row i is (path, label), and meta.json."""

    path: Path
    index: object
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    meta: dict

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"


def read_meta(path: Path) -> dict | None:
    """meta.json of ``path`` when it names this index format (the proof that mltk wrote the folder), else None."""
    try:
        with open(path / "meta.json", "rb") as f:
            text = f.read(META_MAX + 1)
        meta = json.loads(text) if len(text) <= META_MAX else None
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def check_request(out: str | Path, kind: str = "flat", batch_size: int = 128, workers: int = 2, **options) -> Path:
    """What ``write_index_dir`` can check before the model loads: the kind, sizes, options and ``out``.

    Returns where the index will be written: ``out`` made absolute (a symbolic link: the folder it
    names). ``out`` is new, an empty folder, or an index mltk wrote that holds nothing else;
    anything else is refused and left as it is.
    """
    check_options(kind, **options)
    for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0)):
        if value < least:
            raise UsageError(f"{name}={value}: it is at least {least}")
    given = str(out)
    check_dir(out)
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        try:
            out = out.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MltkError(f"--out {given!r} is a symbolic link to nowhere; give a folder") from None
    check_dir(out.parent, f"the folder of --out {given!r}")  # the index is made beside it, then renamed
    _check_replaceable(out, given)
    return out


def _check_replaceable(out: Path, given: str) -> None:
    """``out`` is absent, empty, or an mltk index and nothing else: what may be removed to put a new index there."""
    if not out.is_dir():
        return
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise MltkError(f"cannot read --out {given!r}: {exc.strerror}") from None
    if entries and read_meta(out) is None:
        raise MltkError(f"--out {given!r} is a folder that is not an mltk index (it holds {_some(entries)}); give a new or empty folder")
    foreign = [name for name in entries if name not in WRITTEN]
    if foreign:
        raise MltkError(
            f"--out {given!r} is an mltk index but also holds {_some(foreign)}, which `mltk index` does not write "
            "and replacing the index would delete; move them out or give another --out"
        )


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def write_index_dir(
    model, data, out: str | Path, kind: str = "flat", *, run: str = "", batch_size: int = 128, workers: int = 2,
    progress: Progress | None = None, **options,
) -> tuple[IndexDir, list]:
    """Embed ``data`` with ``model`` and write the index directory ``out``; returns it and the unreadable images left out.

    ``out`` holds index.faiss, embeddings.npy (row i = line i of paths.txt), paths.txt, labels.npy,
    classes.json, model.pt (a slim mltk checkpoint: ``mltk.load(out / "model.pt")`` works), meta.json
    and, when images were left out, skipped_images.txt. It is built in a temporary sibling and
    renamed into place, so ``out`` is never half-written; an earlier index there is replaced, a
    folder holding anything else is refused (``check_request``). Temporaries that killed runs left
    beside ``out`` are removed first. ``options`` go to ``build`` (nlist, nprobe, m, ef_construction,
    ef_search, seed).
    """
    import faiss
    import torch

    from mltk import __version__
    from mltk.config import to_dict
    from mltk.data import write_skipped
    from mltk.evaluate import embed, readable
    from mltk.model import save_checkpoint

    given = str(out)
    out = check_request(out, kind, batch_size, workers, **options)
    skipped: list = []
    data = readable(data, skipped)
    check_options(kind, len(data), model.embedder.dim, **options)
    paths = _paths(data)
    _remove_stale(out)
    made = [p for p in out.parents if not p.exists()]  # removed again if no index comes of it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        vectors = embed(model, data, batch_size, workers, progress=progress, out=tmp / "embeddings.npy")
        index = build(vectors, kind, progress=progress, **options)
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "paths.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8", errors="surrogateescape")
        np.save(tmp / "labels.npy", np.asarray(data.labels, np.int64))
        (tmp / "classes.json").write_text(json.dumps(list(data.classes)))
        weights = {k: v.detach().cpu() for k, v in model.embedder.state_dict().items()}
        config = to_dict(model.config) if model.config is not None else None
        save_checkpoint({"config": config, "data_config": model.data_config, "classes": model.classes, "model": weights}, tmp / "model.pt")
        if skipped:
            write_skipped(tmp / "skipped_images.txt", skipped)
        meta = {
            "format": FORMAT, "kind": kind, "metric": "inner_product", "dim": int(vectors.shape[1]), "count": len(paths),
            "params": settings(index), "run": str(run), "data": data.name, "mltk_version": __version__,
            "faiss_version": faiss.__version__, "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        del vectors  # the memmap: closed before the folder moves
        _swap_in(tmp, out, given)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # the deepest first; one that holds something now is kept
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_error(exc, f"index directory {given!r}", "nothing there was changed") from None
        raise
    return IndexDir(out, index, paths, np.asarray(data.labels, np.int64), list(data.classes), meta), skipped


def _paths(data) -> list[str]:
    """Line i of paths.txt: image i's absolute path; one with a line break in its name cannot be a line."""
    paths = [str(Path(s).resolve()) if isinstance(s, (str, Path)) else f"{data.name}[{i}]" for i, s in enumerate(data.sources)]
    broken = next((p for p in paths if "\n" in p), None)
    if broken is not None:
        raise MltkError(f"image {broken!r} has a line break in its path, and paths.txt holds one path a line; rename it")
    return paths


def _remove_stale(out: Path) -> None:
    """What killed runs writing ``out`` left beside it: ``.NAME.tmp-PID`` and ``.NAME.old-PID`` of processes that are gone."""
    for stale in stale_temporaries(out.parent, out.name):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _swap_in(tmp: Path, out: Path, given: str) -> None:
    """Rename ``tmp`` to ``out``; an earlier ``out`` is moved aside first and removed after.

    ``out`` is checked again first: files put there while the index was built are not removed with it.
    """
    _check_replaceable(out, given)
    old = aside(out)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def open_index_dir(path: str | Path) -> IndexDir:
    """An index directory written by ``write_index_dir``, checked whole; a problem is one line naming its file.

    Every file is untrusted: each must agree with meta.json (kind, dimensions, count), labels.npy is
    a 1-D integer array read without pickles, and every label names a class of classes.json.
    embeddings.npy, which a search does not read, is checked (its header) only when it is there: it
    may be deleted to save space. model.pt is checked when ``search_images`` loads it.
    """
    import faiss

    path = Path(path)
    if not path.is_dir():
        where = "is a file, not a folder" if path.exists() else "does not exist"
        raise MltkError(f"index directory {str(path)!r} {where}; write one with `mltk index RUN --data GALLERY --out DIR`")
    meta = read_meta(path)
    if meta is None:
        raise MltkError(f"{str(path)!r} is not an mltk index directory (no meta.json of format {FORMAT})")
    _check_meta(path, meta)
    dim, count = meta["dim"], meta["count"]
    for name in ("index.faiss", "paths.txt", "labels.npy", "classes.json", "model.pt"):
        if not (path / name).is_file():
            raise _damaged(path, name, "is missing")
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as exc:
        raise _damaged(path, "index.faiss", f"cannot be read by faiss ({_first_line(exc)})") from None
    found = {"kind": kind_of(index), "dim": index.d, "count": index.ntotal}
    for key, value in found.items():
        if value != meta[key]:
            raise _damaged(path, "index.faiss", f"has {key} {value}; meta.json says {meta[key]}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _damaged(path, "index.faiss", "does not rank by inner product")
    paths = _read_paths(path, count)
    classes = _read_classes(path)
    labels = _read_labels(path, count, len(classes))
    if (path / "embeddings.npy").exists():
        shape, dtype = _npy_header(path, "embeddings.npy")
        if shape != (count, dim) or dtype != np.float32:
            raise _damaged(path, "embeddings.npy", f"holds {dtype} {shape}; expected float32 ({count}, {dim})")
    return IndexDir(path, index, paths, labels, classes, meta)


def _damaged(path: Path, name: str, problem: str) -> MltkError:
    return MltkError(f"index directory {str(path)!r} is damaged: {name} {problem}; write it again with `mltk index`")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_meta(path: Path, meta: dict) -> None:
    for key, kind in META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise _damaged(path, "meta.json", f"has {key}={reprlib.repr(meta.get(key))}; expected {kind.__name__}")
    for key in META_TEXT:
        if key in meta and not isinstance(meta[key], str):
            raise _damaged(path, "meta.json", f"has {key}={reprlib.repr(meta[key])}; expected str")
    problems = [
        (meta["kind"] not in KINDS, f"kind={meta['kind']!r}; expected one of {', '.join(KINDS)}"),
        (meta["metric"] != "inner_product", f"metric={meta['metric']!r}; expected 'inner_product'"),
        (meta["dim"] < 1 or meta["count"] < 1, f"dim={meta['dim']}, count={meta['count']}; expected at least 1"),
        (not all(isinstance(v, int) and not isinstance(v, bool) for v in meta["params"].values()), f"params={reprlib.repr(meta['params'])}; expected whole numbers"),
    ]
    for wrong, problem in problems:
        if wrong:
            raise _damaged(path, "meta.json", f"has {problem}")


def _read_paths(path: Path, count: int) -> list[str]:
    """paths.txt, a path a line: split at line feeds only (``splitlines`` would also split at characters a file name may hold)."""
    try:
        lines = (path / "paths.txt").read_bytes().decode("utf-8", errors="surrogateescape").split("\n")
    except OSError as exc:
        raise _damaged(path, "paths.txt", f"cannot be read ({exc.strerror})") from None
    if lines[-1] == "":
        lines.pop()
    if len(lines) != count:
        raise _damaged(path, "paths.txt", f"has {len(lines)} lines; meta.json says {count} images")
    return lines


def _read_classes(path: Path) -> list[str]:
    try:
        classes = json.loads((path / "classes.json").read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise _damaged(path, "classes.json", f"is not JSON ({_first_line(exc)})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise _damaged(path, "classes.json", f"holds {reprlib.repr(classes)}; expected a list of class names (strings)")
    return classes


def _read_labels(path: Path, count: int, classes: int) -> np.ndarray:
    shape, dtype = _npy_header(path, "labels.npy")
    if shape != (count,) or dtype.kind not in "iu":
        raise _damaged(path, "labels.npy", f"holds {dtype} {shape}; expected integers ({count},)")
    try:
        labels = np.load(path / "labels.npy", allow_pickle=False).astype(np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(path, "labels.npy", f"cannot be read ({_first_line(exc)})") from None
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(outside):
        raise _damaged(path, "labels.npy", f"has label {labels[outside[0]]} at row {outside[0]}; classes.json names {classes} classes (0 to {classes - 1})")
    return labels


def _npy_header(path: Path, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of an .npy file, read from its header and checked against its size: a forged header allocates nothing."""
    from numpy.lib import format as npy

    try:
        with open(path / name, "rb") as f:
            version = npy.read_magic(f)
            read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"npy format version {version}")
            shape, _, dtype = read(f)
            data = os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise _damaged(path, name, f"is not a numpy array file ({_first_line(exc)})") from None
    if dtype.hasobject:
        raise _damaged(path, name, "holds Python objects, not numbers")
    if data != math.prod(shape) * dtype.itemsize:
        raise _damaged(path, name, f"holds {data} bytes of data; its header announces {dtype} {shape}")
    return shape, dtype


def search_images(
    index_dir: str | Path, images: list[str | Path], k: int = 5, *, nprobe: int | None = None, ef_search: int | None = None,
    device: str | None = None, batch_size: int = 64, workers: int = 0,
) -> list[dict]:
    """The k nearest gallery images of each query image: [{query, neighbours: [{rank, path, label, class, score}]}]."""
    from mltk.data import LabelledImages, check_image
    from mltk.evaluate import embed
    from mltk.model import load

    opened = open_index_dir(index_dir)
    if not 1 <= k <= opened.index.ntotal:
        raise UsageError(f"k={k}: give 1 to {opened.index.ntotal}, the number of images in the index")
    configure(opened.index, nprobe, ef_search)
    for image in images:
        problem = _not_an_image(Path(image)) or check_image(image)
        if problem:
            raise MltkError(f"query image {str(image)!r} cannot be read: {problem}")
    model = load(opened.model_file, device)
    if model.embedder.dim != opened.meta["dim"]:
        raise _damaged(opened.path, "model.pt", f"embeds in {model.embedder.dim} dimensions; the index holds {opened.meta['dim']}")
    vectors = embed(model, LabelledImages(list(images), [0] * len(images), ["?"]), batch_size, workers)
    sims, positions = neighbours(opened.index, vectors, k)
    return [
        {
            "query": str(image),
            "neighbours": [
                {"rank": r + 1, "path": opened.paths[p], "label": int(opened.labels[p]), "class": opened.classes[opened.labels[p]], "score": float(s)}
                for r, (s, p) in enumerate(zip(sims[i], positions[i]))
            ],
        }
        for i, image in enumerate(images)
    ]


def _not_an_image(path: Path) -> str | None:
    if path.is_dir():
        return "it is a folder, not an image file"
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "it is not a regular file"
    return None
