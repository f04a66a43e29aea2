"""The numba kernels of mltk.allpairs' blockwise pass: each consumes a block of similarities on the CPU.

Each query keeps a heap of its k best (similarity, gallery index) with the worst at the root; "worse" is
a lower similarity, or an equal one with a higher index, which makes the kept set exactly that of a
stable sort. The pair histogram counts every pair of a row in one increment (no label test in the hot
loop) and the pairs of the query's class apart. Imported on first use (mltk.allpairs stays light to
import); compiled once and cached on disk by numba (``cache=True``: in ``__pycache__`` beside this file,
or numba's user-wide cache where that is not writable), so only the first evaluation on a machine waits
for the compiler.
"""

import numba
import numpy as np

jit = numba.njit(nogil=True, cache=True)
CHUNK = 32  # items a query's heap is offered at once: most chunks hold nothing better than the root


@jit
def worse(v1, i1, v2, i2):
    return v1 < v2 or (v1 == v2 and i1 > i2)


@jit
def sift_down(hv, hi, n, v, g):  # put (v, g) at the root of heap[:n] and restore the heap
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and worse(hv[child + 1], hi[child + 1], hv[child], hi[child]):
            child += 1
        if not worse(hv[child], hi[child], v, g):
            break
        hv[pos], hi[pos] = hv[child], hi[child]
        pos = child
    hv[pos], hi[pos] = v, g


@numba.njit(nogil=True, fastmath=True, cache=True)
def chunk_max(row, lo, hi_):  # vectorised: most chunks hold nothing better than the root
    m = row[lo]
    for j in range(lo + 1, hi_):
        m = max(m, row[j])
    return m


@jit
def offer(row, lo, hi_, c0, hv, hi):  # row[lo:hi_] are gallery items c0+lo.. for one query
    for c in range(lo, hi_, CHUNK):
        end = min(c + CHUNK, hi_)
        if chunk_max(row, c, end) >= hv[0]:
            for j in range(c, end):
                if row[j] >= hv[0] and not worse(row[j], c0 + j, hv[0], hi[0]):
                    sift_down(hv, hi, hv.shape[0], row[j], c0 + j)


@jit
def bin_of(score, nbins):  # as _bin_of: in float64
    return min(max(int((score + 1.0) * (nbins / 2)), 0), nbins - 1)


@jit
def count(row, lo, every):  # histogram every pair of row[lo:] (no label test: the hot loop is one increment)
    nbins = every.shape[0]
    for c in range(lo, row.shape[0]):
        every[bin_of(row[c], nbins)] += 1


@jit
def count_same(row, lo, c0, members, same):  # histogram the pairs of row[lo:] with the query's class mates
    n = row.shape[0]
    for m in range(np.searchsorted(members, c0 + lo), members.shape[0]):
        c = members[m] - c0
        if c >= n:
            break
        same[bin_of(row[c], same.shape[0])] += 1


@jit
def rows(S, lo, hi_, r0, c0, diagonal, knn, hv, hi, hist, qlab, by_label, label_start, every, same):
    n = S.shape[1]
    for r in range(lo, hi_):
        q = r0 + r
        if knn and diagonal:  # leave the query itself out
            offer(S[r], 0, r, c0, hv[q], hi[q])
            offer(S[r], r + 1, n, c0, hv[q], hi[q])
        elif knn:
            offer(S[r], 0, n, c0, hv[q], hi[q])
        if hist:  # on the diagonal block, only the pairs r < c
            label = qlab[q]
            members = by_label[label_start[label] : label_start[label + 1]]
            count(S[r], r + 1 if diagonal else 0, every)
            count_same(S[r], r + 1 if diagonal else 0, c0, members, same)


@numba.njit(nogil=True, fastmath=True, cache=True)
def chunk_hits(row, thr, lo, hi_):
    n = 0
    for j in range(lo, hi_):
        n += row[j] >= thr[j]
    return n


@jit
def cols(S, lo, hi_, r0, c0, hv, hi, thr):  # the transposed block: columns are the queries
    for r in range(S.shape[0]):
        row, g = S[r], r0 + r
        for c in range(lo, hi_, CHUNK):
            end = min(c + CHUNK, hi_)
            if chunk_hits(row, thr, c, end):
                for j in range(c, end):
                    q = c0 + j
                    if row[j] >= thr[j] and not worse(row[j], g, hv[q, 0], hi[q, 0]):
                        sift_down(hv[q], hi[q], hv.shape[1], row[j], g)
                        thr[j] = hv[q, 0]


@jit
def sort_heaps(hv, hi):  # heapsort in place: best first
    for q in range(hv.shape[0]):
        for end in range(hv.shape[1] - 1, 0, -1):
            v, g = hv[q, end], hi[q, end]
            hv[q, end], hi[q, end] = hv[q, 0], hi[q, 0]
            sift_down(hv[q], hi[q], end, v, g)


@jit
def recount(S, K, lo, hi_, r0, c0, diagonal, qlab, glab, first, cell_lo, cell_hi, pieces, offset, fine, low, high):
    # rows lo..hi_: a pair whose key K falls in a range [cell_lo, cell_hi) of its first-pass bin
    # (those of bin b: first[b] to first[b + 1]) is counted in fine[same?, p], p = offset + its
    # piece, and its key kept in low[p] if lower, high[p] if higher
    nbins = first.shape[0] - 1
    half = nbins / 2
    for r in range(lo, hi_):
        label = qlab[r0 + r]
        for c in range(r + 1 if diagonal else 0, S.shape[1]):
            b = min(max(int((S[r, c] + 1.0) * half), 0), nbins - 1)  # as count bins it
            a, z = first[b], first[b + 1]
            if a == z:
                continue
            bits = K[r, c]
            key = bits if bits >= 0 else -(bits & 0x7FFFFFFF)
            while z - a > 1:  # the last range of the bin that starts at or below key
                m = (a + z) // 2
                if cell_lo[m] <= key:
                    a = m
                else:
                    z = m
            if cell_lo[a] <= key < cell_hi[a]:
                p = offset[a] + (key - cell_lo[a]) * pieces[a] // (cell_hi[a] - cell_lo[a])
                fine[1 if glab[c0 + c] == label else 0, p] += 1
                low[p] = min(low[p], key)
                high[p] = max(high[p], key)


@jit
def flush(every, same, pending, bins, counts):
    # a fold's histograms (pending + the threads' every, the threads' same), emptied in one pass: each bin that
    # holds pairs written to bins[n], its (negative, positive) counts to counts[:, n]; returns n
    n = 0
    for b in range(pending.shape[0]):
        total = pending[b]
        if total:
            pending[b] = 0
        for t in range(every.shape[0]):
            if every[t, b]:
                total += every[t, b]
                every[t, b] = 0
        if total:
            positive = 0
            for t in range(same.shape[0]):
                if same[t, b]:
                    positive += same[t, b]
                    same[t, b] = 0
            bins[n] = b
            counts[0, n] = total - positive
            counts[1, n] = positive
            n += 1
    return n
