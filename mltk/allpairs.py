"""The exact all-pairs pass: every similarity of the queries and the gallery, block by block, never all at once.

One pass computes the blocks ``S = q[r0:r1] @ g[c0:c1].T`` (numpy's BLAS on the CPU, torch on a GPU) and
hands each to its consumers: the kNN heaps of every query, and the pair histogram, ``BINS`` bins over
[-1, 1] per fold and kind of pair (same class or not). Two back ends consume the blocks and give identical
arrays: ``mltk.metrics_kernels`` (numba, on the CPU) and ``mltk.gpu_pass`` (torch ops, where the block is).
A bin that holds more than ``MERGED`` of the positive or of the negative pairs is counted again, split over
its float32 values (``_resolve``), so the counts move no rate by more than ``MERGED``.

What the pass reads of an evaluation (``mltk.metrics.Evaluation``): its embeddings, labels, query and gallery
(positions), ``loo`` (leave-one-out: the pairs i < j of one set), ``folds``, ``block`` and ``device``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mltk.roc import Binned

BINS = 1 << 20
MERGED = 1e-4  # the most of the positive or of the negative pairs one bin of distinct scores may hold
SPLIT = BINS // 4  # bins a pass that splits heavy bins may use, over all of them
BLOCK = 4096
GPU_BLOCK = 16384  # rows a block of the pass on a GPU at least: 1 GiB of float32 similarities, fewer launches and syncs
_WORST = -3.0  # below any cosine similarity: an empty heap slot


def take_rows(x, rows: np.ndarray):
    """x[rows]: a view when ``rows`` is a contiguous range (a memmap stays on disk), else a copy of those rows."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        return x[int(rows[0]) : int(rows[0]) + len(rows)]
    return x[rows]


# ---- the blockwise pass: BLAS products; numba kernels (or, on a GPU, torch) consume each block ---------


def _kernels():
    """The kernels that consume a block of similarities (``mltk.metrics_kernels``: numba, GIL released)."""
    from mltk import metrics_kernels as k

    return k.rows, k.cols, k.sort_heaps, k.recount, k.flush


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


def block_pass(ev, k: int, knn: bool, hist: bool) -> tuple[tuple[np.ndarray, np.ndarray], Binned | None]:
    """(the k nearest of every query: (similarities, gallery positions) best first, or (k = 1) placeholders without
    ``knn``; the pair counts, or None without ``hist``), from the similarities block by block (``_sweep``): each
    block feeds the kNN heaps and the per-fold histograms.

    A leave-one-out block's rows feed their queries' heaps and the histogram, its columns their
    queries' heaps. The gallery is offered to each query in index order, so a tie never displaces
    an earlier item. Bins too heavy to merge are counted again after (``_resolve``).
    """
    qlab, glab = ev.labels[ev.query], ev.labels[ev.gallery]
    device = _device(ev)
    if _torch_pass(device):  # the blocks are consumed where they are computed (mltk.gpu_pass): none comes to the host
        from mltk.gpu_pass import BlockConsumer

        consumer = BlockConsumer(qlab, glab, k=k, knn=knn, hist=hist, folds=ev.folds, loo=ev.loo, bins=BINS, empty=_WORST, device=device, compile=True)
        _sweep(ev, 1, consumer.consume, consumer.fold_done if hist else None, on_device=True)
        heaps, by_fold = consumer.result()
        consumer = None  # its device memory
        used = np.flatnonzero(by_fold.sum(axis=(0, 1)))
        counts = by_fold[:, :, used]
        by_fold = None  # the full-size histograms: freed before any pass that splits heavy bins
    else:
        heaps, (used, counts) = _numba_pass(ev, k, knn, hist, qlab, glab)
    return heaps, (_resolve(ev, used, counts) if hist else None)


def _numba_pass(ev, k: int, knn: bool, hist: bool, qlab: np.ndarray, glab: np.ndarray):
    """``block_pass`` on the CPU, by the numba kernels: ((similarities, indices) best first, (the bins that hold pairs,
    their counts (folds, same?, bin)))."""
    rows_kernel, cols_kernel, sort_heaps, *_ = _kernels()
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
    return (hv, hi), counts.used()


def _int32_room(block: int) -> int:
    """Pairs int32 counts may hold and still take one more block of ``block`` rows; 0 where a block could overflow them
    alone (more than 32,768 rows), and int64 counts are kept instead."""
    return 2**31 - 1 - block * block if block * block <= 2**30 else 0


class _FoldCounts:
    """The first pass's histograms. The threads count every pair in int32 (the hot loop is one increment, no label
    test) and the pairs of one class apart in int64; both are added into the fold's int64 (negative, positive)
    counts when the fold is done, and the int32 ones before one more block could overflow them.

    A done fold keeps only its bins that hold pairs (a small set holds far fewer pairs than ``BINS``): the threads'
    histograms are read and emptied in one pass of the ``flush`` kernel, and no (folds, 2, BINS) array is made."""

    def __init__(self, folds: int, threads: int, bins: int, block: int):
        self.limit = _int32_room(block)
        self.every = np.zeros((threads, bins), np.int32 if self.limit else np.int64)
        self.same = np.zeros((threads, bins), np.int64)
        self.pending = np.zeros(bins, np.int64)  # every pair of the fold so far, from the int32 counts
        self.folds: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros((2, 0), np.int64))] * folds  # (bins, counts (same?, bin))
        self.since = 0  # pairs counted into ``every`` since it was last emptied (at most, on one thread)
        self.out = np.empty(bins, np.int64), np.empty((2, bins), np.int64)  # what ``flush`` writes, reused fold after fold

    def counted(self, pairs: int) -> None:
        self.since += pairs
        if self.limit and self.since > self.limit:
            self._empty()

    def _empty(self) -> None:
        self.pending += self.every.sum(0, dtype=np.int64)
        self.every[:] = 0
        self.since = 0

    def fold_done(self, f: int) -> None:
        *_, flush = _kernels()
        bins, counts = self.out
        n = flush(self.every, self.same, self.pending, bins, counts)
        self.folds[f] = bins[:n].copy(), counts[:, :n].copy()
        self.since = 0

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """(the bins that hold pairs of any fold, their counts (folds, same?, bin))."""
        seen = np.zeros(len(self.pending), bool)
        for bins, _ in self.folds:
            seen[bins] = True
        used = np.flatnonzero(seen)
        counts = np.zeros((len(self.folds), 2, len(used)), np.int64)
        for f, (bins, fold) in enumerate(self.folds):
            counts[f][:, np.searchsorted(used, bins)] = fold
        return used, counts

    @property
    def by_fold(self) -> np.ndarray:
        """The counts as one (folds, same?, bins) array."""
        used, counts = self.used()
        whole = np.zeros((len(self.folds), 2, len(self.pending)), np.int64)
        whole[:, :, used] = counts
        return whole


def _sweep(ev, threads: int, consume, fold_done=None, on_device: bool = False) -> None:
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

        product = _products(ev, _device(ev), block, on_device, split)

        for b, (r0, r1) in enumerate(row_blocks):
            for c0, c1 in col_blocks[b:] if ev.loo else col_blocks:
                consume(product(r0, r1, c0, c1), r0, c0, ev.loo and r0 == c0, split)
            if fold_done and (b + 1 == len(row_blocks) or fold_of[b + 1] != fold_of[b]):
                fold_done(fold_of[b])


def _products(ev, device: str, block: int, on_device: bool, split):
    """The block of similarities of query rows [r0, r1) and gallery rows [c0, c1), as a function of (r0, r1, c0, c1):
    a float32 numpy array, or with ``on_device`` a torch tensor on ``device``; a buffer reused by the next call
    (fresh pages cost page faults).

    On the CPU numpy's BLAS computes it, each of ``split``'s threads its share of the rows with one BLAS thread
    (``_one_blas_thread``): BLAS's own worker threads would keep spinning after each product, on the cores the
    kernels that consume the block need. On a GPU torch computes it, in float32 (TF32 as torch's settings allow).
    """
    import torch

    q = take_rows(ev.embeddings, ev.query)
    g = q if ev.loo else take_rows(ev.embeddings, ev.gallery)
    size = min(block, len(q)) * min(block, len(g))  # the largest block: a small set's is small
    if device == "cpu":
        buffer = np.empty(size, np.float32)

        def matmul(r0, r1, c0, c1):
            S = buffer[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            split(r1 - r0, lambda lo, hi, t: np.matmul(q[r0 + lo : r0 + hi], g[c0:c1].T, out=S[lo:hi]))
            return S

        return (lambda *rows: torch.from_numpy(matmul(*rows))) if on_device else matmul
    tq = _tensor(q, device)
    tg = tq if ev.loo else _tensor(g, device)
    buffer = torch.empty(size, device=device)

    def product(r0, r1, c0, c1):
        S = torch.mm(tq(r0, r1), tg(c0, c1).T, out=buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
        return S if on_device else S.cpu().numpy()

    return product


def _one_blas_thread():
    """BLAS limited to one thread inside the block (threadpoolctl): the pass runs its products in its own threads."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _device(ev) -> str:
    """Where the blockwise pass runs: the evaluation's ``device`` where it is a CUDA one, the CPU where it is any other
    (the pass's consumers are the numba kernels there); with none given, where ``mltk.devices`` puts ``auto``."""
    import torch

    from mltk.devices import resolve_device

    device = resolve_device(None) if ev.device is None else torch.device(ev.device)
    return str(device) if device.type == "cuda" else "cpu"


def _torch_pass(device: str) -> bool:
    """Whether the blocks are consumed with torch where they are (mltk.gpu_pass), rather than by the numba kernels on
    the CPU: on a GPU, where the kernels would need every block copied to the host (2 TB at N = 1,000,000)."""
    return device != "cpu"


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


def _resolve(ev, bins: np.ndarray, counts: np.ndarray) -> Binned:
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


def _recount(ev, bins: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """One more pass over all pairs: the ranges of keys [lo, hi) (within the first pass's ``bins``, sorted by bin then
    key) each split into at most ``SPLIT // len(lo)`` equal ranges. Returns those that hold pairs as (bins, lo, hi,
    counts (folds, same?, range)), each narrowed to the keys it holds: [its least, its greatest + 1)."""
    pieces = np.minimum(hi - lo, max(2, SPLIT // len(lo)))
    offset = np.concatenate([[0], np.cumsum(pieces)])
    first = np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=BINS))])  # the ranges in bin b: first[b] to first[b + 1]
    qlab, glab = ev.labels[ev.query], ev.labels[ev.gallery]
    device = _device(ev)
    if _torch_pass(device):  # on the GPU, where the blocks are (mltk.gpu_pass)
        from mltk.gpu_pass import RecountConsumer

        consumer = RecountConsumer(qlab, glab, folds=ev.folds, loo=ev.loo, first=first, lo=lo, hi=hi, pieces=pieces, offset=offset, device=device)
        _sweep(ev, 1, consumer.consume, consumer.fold_done, on_device=True)
        by_fold, low, high = consumer.result()
    else:
        *_, recount_kernel, _ = _kernels()
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

