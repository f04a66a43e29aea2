"""The blockwise pass's per-block work in torch ops, on the device that holds the block.

``mltk.allpairs`` computes every block of similarities ``S = q[r0:r1] @ g[c0:c1].T`` and hands it to numba kernels
on the CPU: the kNN heaps (``rows``, ``cols``, ``sort_heaps``), the pair histogram (``count``) and the pass that
splits heavy bins (``recount``). On a GPU that copies every block to the host (2 TB at N = 1,000,000) and
histograms 5e11 scores on a few CPU cores. The consumers here do the same work where the block is, with torch
ops (so they run on CPU tensors too, which is how they are tested), and give results IDENTICAL to the kernels':

- kNN: each query keeps its k best (similarity, gallery index), "better" meaning a higher similarity or an equal
  one with a lower index (a stable sort's choice; -0.0 equals 0.0), best first; an empty slot is (``empty``,
  int64 max), as the heaps start. Only an item not below a query's k-th best can enter its list. A query with
  at most k such items in a block takes them all (most queries, once the lists fill); one with more (the first
  blocks) takes the block's k best by ``topk(k + 1)``, and where the (k+1)-th value equals the k-th (topk
  breaks such ties at random) its k best again by ``topk`` over an int64 key that orders (value, index) with
  no ties at all (``_order_key``). Candidates and list are merged by that key: the same set and order as the
  heaps, whatever order the blocks come in.
- Histogram: a score s goes to bin ``min(max(int((s + 1.0) * (bins/2)), 0), bins - 1)`` computed in float64,
  the kernel's own arithmetic (``_bin``), counted in ``bin + bins * same?`` by ``index_add_`` on the device; a
  fold's counts go to the host when the caller says the fold is done.
- Recount: a pair whose float32 key lies in one of the given ranges of its own bin is counted in its piece of
  that range, and the least and greatest key of each piece are kept (``scatter_reduce_``), as ``recount`` does.

Memory: a block is consumed in chunks of at most ``chunk`` elements (rows; columns for the transposed kNN pass),
so what it needs beyond itself is bounded by the chunk, whatever the block size: at most about 16 bytes per
chunk element (512 MiB at the default 2**25; the histogram's float64 bins and int32 keys take 12, the kNN
masks 2, a diagonal block's copy 4, the exact selection of tied rows 5), plus the lists (12 bytes per query and
neighbour) and the histogram (16 bytes per bin). Host syncs: one or two per chunk for the kNN (how many queries
take the sparse and the dense way, and where the sparse ones' items are), one more for a chunk with a tie at a
list's end, one per diagonal chunk of the histogram, two per chunk of the recount; none otherwise. The recount
keeps up to about 56 bytes per element of its chunk (2**23 by default: 448 MiB) when every pair of it lies in a
heavy range, about 5 when none does.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_LOW = (1 << 32) - 1  # an index's share of an order key: the lowest index gets the highest share


def _order_key(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys that order (float32 value, index) pairs as the heaps do: higher value first, then lower index.

    The value's part is its float32 key (bits if >= 0, else -(bits & 0x7FFFFFFF): monotone, -0.0 and 0.0
    alike), times 2**32; the index's part is 2**32 - 1 - index, index clamped there (an empty slot's int64 max
    comes last among equal values). Distinct (value, index) pairs with index < 2**32 - 1 get distinct keys.
    """
    bits = values.contiguous().view(torch.int32)
    key = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)).to(torch.int64)
    return key * (1 << 32) + (_LOW - index.clamp(max=_LOW))


def _float_key(S: torch.Tensor) -> torch.Tensor:
    """The int32 key of each float32 score, as ``recount`` computes it from the bits."""
    bits = S.contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _half(bins: int, device) -> torch.Tensor:
    """bins / 2 as a one-element float64 tensor: added to a float32 tensor, it makes the sum float64."""
    return torch.tensor([bins / 2], dtype=torch.float64, device=device)


def _bin(S: torch.Tensor, bins: int, half: torch.Tensor) -> torch.Tensor:
    """The first pass's int32 bin of each float32 score, as ``count`` computes it: int((s + 1.0) * half) clamped.

    ``half + half * s`` in float64 (``half`` from ``_half``) rounds once, as ``(s + 1.0) * half`` does (half is
    a power of two: the product is exact, so a fused multiply-add rounds the same, and scaling commutes with
    rounding); ``to`` truncates toward zero, as ``int()``; clamping before or after it gives the same bins.
    """
    w = torch.add(half, S, alpha=bins // 2)
    return w.clamp_(0, bins - 1).to(torch.int32)


def _keys(X: torch.Tensor, qlab: torch.Tensor, glab: torch.Tensor, bins: int, half: torch.Tensor) -> torch.Tensor:
    """The histogram index of each pair of the block X (queries ``qlab`` x gallery ``glab``): bin + bins * same?."""
    key = _bin(X, bins, half)
    return key.add_(qlab[:, None] == glab[None, :], alpha=bins)


def _count_into(counts: torch.Tensor, X: torch.Tensor, qlab: torch.Tensor, glab: torch.Tensor, bins: int, half: torch.Tensor, one: torch.Tensor):
    """Every pair of X counted in ``counts`` (what ``torch.compile`` fuses into one pass over X, when asked)."""
    key = _keys(X, qlab, glab, bins, half).view(-1)
    counts.index_add_(0, key, one.expand(key.numel()))


def _compiled(function):
    """``function`` compiled by ``torch.compile`` on first use, or ``function`` itself should compiling fail (no
    compiler for the device, say): the results are the same, only slower; a warning says so, once."""
    import torch._dynamo.exc
    import torch._inductor.exc

    compiled = torch.compile(function, dynamic=True)

    def call(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as exc:  # raised before it runs
            if compiled is function:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}); the pair histogram is counted without it", stacklevel=2)
            compiled = function
            return function(*args)

    return call


def _upper(n: int, m: int, row0: int, device) -> torch.Tensor:
    """Mask of the pairs c > r of rows row0 .. row0 + n of a diagonal block (the pairs it counts)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).triu_(row0 + 1)


class BlockConsumer:
    """The kNN lists and the per-fold pair histogram of a blockwise pass, built block by block on ``device``.

    ``qlab``/``glab``: the labels of the queries and the gallery (numpy); ``k``: neighbours a query keeps;
    ``knn``/``hist``: what to build; ``folds``: histogram folds; ``loo``: leave-one-out (query == gallery,
    only the blocks on and above the diagonal are given); ``bins``: histogram bins over [-1, 1] (a power of
    two); ``empty``: the value of an empty list slot (below any similarity). ``chunk``: the most elements a
    block is processed in at once (see the module's docstring). ``compile``: count the pairs with
    ``torch.compile(dynamic=True)``: one fused pass over the block instead of five, off the diagonal
    (compiled on first use, in seconds).
    """

    def __init__(
        self, qlab, glab, *, k: int, knn: bool, hist: bool, folds: int, loo: bool, bins: int, empty: float, device,
        chunk: int = 1 << 25, compile: bool = False,
    ):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, not {bins}")
        self.device = torch.device(device)
        self.qlab = torch.as_tensor(np.asarray(qlab), device=self.device)
        self.glab = self.qlab if loo else torch.as_tensor(np.asarray(glab), device=self.device)
        if len(self.glab) >= _LOW:
            raise ValueError(f"{len(self.glab)} gallery items: the order keys hold indices below 2**32 - 1")
        self.k, self.knn, self.hist, self.loo, self.bins, self.chunk = k, knn, hist, loo, bins, chunk
        shape = (len(self.qlab), k if knn else 1)
        self.hv = torch.full(shape, empty, dtype=torch.float32, device=self.device)
        self.hi = torch.full(shape, torch.iinfo(torch.int64).max, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(2 * bins if hist else 2, dtype=torch.int64, device=self.device)
        self.by_fold = np.zeros((folds, 2, bins if hist else 1), np.int64)
        self._ones = torch.ones(1, dtype=torch.int64, device=self.device)
        self._half = _half(self.bins, self.device)
        self._count_into = _compiled(_count_into) if compile else _count_into

    def consume(self, S: torch.Tensor, r0: int, c0: int, diagonal: bool, split=None) -> None:
        """Take in the block S = queries r0.. x gallery c0..; ``diagonal``: a leave-one-out block with r0 == c0.

        Rows feed their queries' lists and the histogram (on the diagonal only the pairs r < c, and not the
        query itself); with ``loo`` an off-diagonal block's columns feed their queries' lists too. ``split`` is
        ignored: it is there so that this method can be ``_sweep``'s ``consume`` as it is.
        """
        n, m = S.shape
        step = max(1, self.chunk // max(m, 1))
        for a in range(0, n, step):
            rows = S[a : a + step]
            if self.hist:
                self._count(rows, r0 + a, c0, a if diagonal else None)
            if self.knn:
                if diagonal:  # the query itself: -inf ranks below every slot, even an empty one
                    rows = rows.clone()
                    rows.diagonal(a).fill_(float("-inf"))
                self._offer(rows, r0 + a, c0)
        if self.knn and self.loo and not diagonal:  # the transposed block: columns are the queries
            step = max(1, self.chunk // max(n, 1))
            for a in range(0, m, step):
                self._offer(S[:, a : a + step].t(), c0 + a, r0)

    def fold_done(self, f: int) -> None:
        """Fold f's rows are all consumed: its counts go to the host."""
        if self.hist:
            self.by_fold[f] += self.counts.view(2, -1).cpu().numpy()
            self.counts.zero_()

    def result(self) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """((similarities, indices) (queries, k) best first, counts (folds, same?, bin)), as numpy."""
        return (self.hv.cpu().numpy(), self.hi.cpu().numpy()), self.by_fold

    def _count(self, X: torch.Tensor, q0: int, c0: int, diagonal_row: int | None) -> None:
        """Histogram the pairs of rows X (queries q0..); ``diagonal_row``: X's first row within a diagonal block,
        whose pairs r >= c are left out."""
        n, m = X.shape
        qlab, glab = self.qlab[q0 : q0 + n], self.glab[c0 : c0 + m]
        if diagonal_row is None:
            self._count_into(self.counts, X, qlab, glab, self.bins, self._half, self._ones)
        else:
            key = _keys(X, qlab, glab, self.bins, self._half)[_upper(n, m, diagonal_row, X.device)]
            self.counts.index_add_(0, key, self._ones.expand(key.numel()))

    def _offer(self, M: torch.Tensor, q0: int, base: int) -> None:
        """Offer items base.. (the columns of M, a view) to queries q0.. (its rows).

        Only an item not below a query's k-th best can enter its list (an equal one with a lower index may).
        A query with at most k such items takes them all (sparse: once the lists fill, most queries have a
        few or none); one with more takes the k best by ``topk`` (dense: the first blocks).
        """
        k = self.k
        above = M >= self.hv[q0 : q0 + len(M), -1, None]
        count = above.sum(1)
        sparse, dense = (count > 0) & (count <= k), count > k
        order = torch.argsort(sparse + 2 * dense, descending=True, stable=True)  # dense queries, then sparse ones
        n_dense, n_sparse = torch.stack([dense.sum(), sparse.sum()]).tolist()  # the one sync of the chunk
        if n_sparse:
            query, item = torch.nonzero(above & sparse[:, None], as_tuple=True)  # by query, then item
            before = torch.cumsum(count * sparse, 0) - count  # the hits of the sparse queries before each
            values = torch.full((len(M), k), float("-inf"), dtype=torch.float32, device=M.device)
            index = torch.full((len(M), k), torch.iinfo(torch.int64).max, device=M.device)
            position = torch.arange(len(query), device=M.device) - before[query]
            values[query, position], index[query, position] = M[query, item], base + item
            few = order[n_dense : n_dense + n_sparse]
            self._merge(q0 + few, values[few], index[few])
        if n_dense:
            many = order[:n_dense]
            values, index = self._best((M if n_dense == len(M) else M[many]).contiguous())
            self._merge(q0 + many, values, index + base)

    def _best(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best (value, column) of each row of M (contiguous, more than k columns), exactly: by ``topk``,
        again by the order key on the rows whose k-th and (k+1)-th values are equal (topk breaks ties at random)."""
        k, m = self.k, M.shape[1]
        values, index = torch.topk(M, k + 1, dim=1)
        tied = torch.nonzero(values[:, k] == values[:, k - 1]).view(-1)
        values, index = values[:, :k], index[:, :k]
        step = max(1, self.chunk // (4 * m))
        for s in range(0, len(tied), step):
            rows = tied[s : s + step]
            sub = M[rows]
            best = torch.topk(_order_key(sub, torch.arange(m, device=M.device)), k, dim=1).indices
            values[rows], index[rows] = sub.gather(1, best), best
        return values, index

    def _merge(self, queries: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """``queries`` keep the k best of their list and the candidates, best first."""
        v = torch.cat([self.hv[queries], values], 1)
        i = torch.cat([self.hi[queries], index], 1)
        best = torch.topk(_order_key(v, i), self.k, dim=1).indices  # distinct keys: one order
        self.hv[queries], self.hi[queries] = v.gather(1, best), i.gather(1, best)


class RecountConsumer:
    """The pass that splits heavy bins (numba's ``recount``), block by block on ``device``.

    The arrays are those ``mltk.allpairs._recount`` builds: ``first`` (bins + 1: bin b's ranges are first[b] to
    first[b + 1]), the ranges of keys [``lo``, ``hi``) sorted by bin then key, each split into ``pieces``
    equal parts numbered from ``offset`` (len(lo) + 1). A pair whose key lies in a range of its own bin is
    counted in fine[same?, piece], and its key kept in low[piece] if lower, high[piece] if higher. Leave-one-out
    diagonal blocks count the pairs r < c only, as the histogram does.
    """

    def __init__(self, qlab, glab, *, folds: int, loo: bool, first, lo, hi, pieces, offset, device, chunk: int = 1 << 23):
        self.device = torch.device(device)
        as_long = lambda a: torch.as_tensor(np.asarray(a, np.int64), device=self.device)  # noqa: E731
        self.qlab = torch.as_tensor(np.asarray(qlab), device=self.device)
        self.glab = self.qlab if loo else torch.as_tensor(np.asarray(glab), device=self.device)
        self.bins = len(first) - 1
        self.lo, self.hi, self.pieces, self.offset = as_long(lo), as_long(hi), as_long(pieces), as_long(offset)
        self.bin_of_range = as_long(np.repeat(np.arange(self.bins), np.diff(first)))
        self.size, self.chunk = int(offset[-1]), chunk
        self.fine = torch.zeros(2 * self.size, dtype=torch.int64, device=self.device)
        self.low = torch.full((self.size,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=self.device)
        self.high = torch.full((self.size,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=self.device)
        self.by_fold = np.zeros((folds, 2, self.size), np.int64)
        self._ones = torch.ones(1, dtype=torch.int64, device=self.device)
        self._half = _half(self.bins, self.device)

    def consume(self, S: torch.Tensor, r0: int, c0: int, diagonal: bool, split=None) -> None:
        """Take in the block S = queries r0.. x gallery c0.. (``split`` ignored, as in ``BlockConsumer``)."""
        if len(self.lo) == 0:
            return
        n, m = S.shape
        step = max(1, self.chunk // max(m, 1))
        for a in range(0, n, step):
            self._count(S[a : a + step], r0 + a, c0, a if diagonal else None)

    def fold_done(self, f: int) -> None:
        self.by_fold[f] += self.fine.view(2, -1).cpu().numpy()
        self.fine.zero_()

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts (folds, same?, piece), least key (piece), greatest key (piece)), as numpy; a piece without
        pairs keeps int64 max and min."""
        return self.by_fold, self.low.cpu().numpy(), self.high.cpu().numpy()

    def _count(self, X: torch.Tensor, q0: int, c0: int, diagonal_row: int | None) -> None:
        n, m = X.shape
        key = _float_key(X)
        near = (key >= self.lo[0]) & (key < self.hi[-1])  # only these can lie in a range
        if diagonal_row is not None:
            near &= _upper(n, m, diagonal_row, X.device)
        r, c = torch.nonzero(near, as_tuple=True)
        key = key[r, c].to(torch.int64)
        a = torch.searchsorted(self.lo, key, right=True) - 1  # the last range starting at or below the key
        inside = torch.nonzero((key < self.hi[a]) & (self.bin_of_range[a] == _bin(X[r, c], self.bins, self._half))).view(-1)
        r, c, key, a = r[inside], c[inside], key[inside], a[inside]
        piece = self.offset[a] + (key - self.lo[a]) * self.pieces[a] // (self.hi[a] - self.lo[a])
        same = (self.qlab[q0 + r] == self.glab[c0 + c]).to(torch.int64)
        self.fine.index_add_(0, piece + self.size * same, self._ones.expand(len(piece)))
        self.low.scatter_reduce_(0, piece, key, "amin")
        self.high.scatter_reduce_(0, piece, key, "amax")
