"""mltk.gpu_pass (the blockwise pass in torch ops, for a GPU) against mltk.metrics' numba kernels: identical arrays.

Run on CPU tensors here. Each case drives the consumers with ``mltk.allpairs._sweep`` itself (the same blocks, so the
same similarities) and compares with what the numba path gives for the same evaluation.
"""

import os
from unittest import mock

import numpy as np
import pytest
import torch

from mltk import allpairs, gpu_pass
from mltk.allpairs import BINS, _WORST
from mltk.metrics import Evaluation, evaluate_embeddings

SMALL_CHUNK = 2000  # elements: every row, column and tie chunk of a block is cut into many pieces


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Blocks of a few hundred rows: one torch thread is several times faster than two (and the results the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normalised(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n=1000, dim=16, classes=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return normalised(rng.standard_normal((classes, dim))[labels] + 1.5 * rng.standard_normal((n, dim))), labels


def duplicated(n=600, seed=2):
    """Each embedding three times, at scattered indices: equal similarities at every list's boundary."""
    x, labels = clustered(n // 3, seed=seed)
    order = np.random.default_rng(seed).permutation(n)
    return np.repeat(x, 3, axis=0)[order], np.repeat(labels, 3)[order]


def quantised(n=600, dim=8, seed=1):
    """Four entries of +-1/2: every similarity a multiple of 1/4, computed exactly: ties everywhere, heavy bins."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x, rng.integers(0, 12, n)


def near_zero(n=150, dim=24, classes=6, seed=0):
    """Nearly orthogonal items (an axis each, plus small class shifts and noise in shared columns): every score
    within 1e-5 of 0, where float32 holds many values a bin, so heavy bins are split, and split again."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = np.zeros((n, n + dim), np.float32)
    x[np.arange(n), np.arange(n)] = 4094 / 4096
    x[:, n:] = 2e-4 * rng.standard_normal((classes, dim))[labels] + 5e-4 * rng.standard_normal((n, dim))
    return x, labels


def on_the_cpu():
    """metrics as on a machine without a GPU: its blocks computed on the CPU, consumed by the numba kernels."""
    return mock.patch.object(torch.cuda, "is_available", return_value=False)


def sweep(ev, consumer):
    """Every block of ``allpairs._sweep`` to ``consumer``: the same blocks, fold ends and similarities (bit for bit)
    as ``numba_pass`` gets; a block goes to the consumer's device (on the CPU, a tensor sharing its memory)."""
    consume = lambda S, r0, c0, diagonal, split: consumer.consume(torch.as_tensor(S, device=consumer.device), r0, c0, diagonal)  # noqa: E731
    with on_the_cpu():
        allpairs._sweep(ev, allpairs._threads(), consume, consumer.fold_done)


def block_consumer(ev, k, knn=True, hist=True, chunk=1 << 25, device="cpu", compile=False):
    qlab, glab = ev.labels[ev.query], ev.labels[ev.gallery]
    return gpu_pass.BlockConsumer(
        qlab, glab, k=k, knn=knn, hist=hist, folds=ev.folds, loo=ev.loo, bins=BINS, empty=_WORST, device=device, chunk=chunk, compile=compile
    )


def numba_pass(ev, k, knn=True, hist=True):
    """(hv, hi), raw histogram (folds, same?, BINS) of mltk.metrics' numba pass."""
    captured = []
    original = allpairs._resolve
    allpairs._resolve = lambda ev, used, counts: captured.append((used, counts))
    try:
        with on_the_cpu():
            heaps, _ = allpairs.block_pass(ev, k, knn, hist)
    finally:
        allpairs._resolve = original
    by_fold = np.zeros((ev.folds, 2, BINS), np.int64)
    if hist:
        used, counts = captured[0]
        by_fold[:, :, used] = counts
    return heaps, by_fold


# ---- what metrics.py runs instead of the numba path (the patch sketch, proven here) ------------------


def block_pass_on_device(ev, k, knn, hist):
    consumer = block_consumer(ev, k, knn, hist)
    sweep(ev, consumer)
    heaps, by_fold = consumer.result()
    used = np.flatnonzero(by_fold.sum(axis=(0, 1)))
    return heaps, (allpairs._resolve(ev, used, by_fold[:, :, used]) if hist else None)


def recount_on_device(ev, bins, lo, hi, chunk=1 << 23, device="cpu"):
    pieces = np.minimum(hi - lo, max(2, allpairs.SPLIT // len(lo)))
    offset = np.concatenate([[0], np.cumsum(pieces)])
    first = np.searchsorted(bins, np.arange(BINS + 1))
    consumer = gpu_pass.RecountConsumer(
        ev.labels[ev.query], ev.labels[ev.gallery], folds=ev.folds, loo=ev.loo, first=first, lo=lo, hi=hi, pieces=pieces, offset=offset, device=device, chunk=chunk
    )
    sweep(ev, consumer)
    by_fold, low, high = consumer.result()
    used = by_fold.sum(axis=(0, 1)) > 0
    cell = np.repeat(np.arange(len(lo)), pieces)[used]
    return bins[cell], low[used], high[used] + 1, by_fold[:, :, used]


# ---- identical arrays -----------------------------------------------------------------------------


QG = {"query": np.arange(0, 1000, 3), "gallery": np.setdiff1d(np.arange(1000), np.arange(0, 1000, 3))}
CASES = {  # data, query/gallery split, block, k, chunk
    "loo, block 300": (clustered, {}, 300, 10, 1 << 25),
    "loo, block 300, small chunks": (clustered, {}, 300, 10, SMALL_CHUNK),
    "loo, k above the blocks": (clustered, {}, 128, 150, 1 << 25),
    "query/gallery": (clustered, QG, 128, 10, 1 << 25),
    "duplicates": (duplicated, {}, 128, 10, 1 << 25),
    "duplicates, small chunks": (duplicated, {}, 128, 10, SMALL_CHUNK),
    "quantised": (quantised, {}, 100, 20, 1 << 25),
    "quantised, query/gallery, small chunks": (quantised, {"query": np.arange(200), "gallery": np.arange(200, 600)}, 64, 20, SMALL_CHUNK),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lists_and_histogram_equal_the_numba_kernels(case):
    data, split, block, k, chunk = CASES[case]
    x, labels = data()
    ev = Evaluation(x, labels, block=block, **split)
    (hv, hi), by_fold = numba_pass(ev, k)
    consumer = block_consumer(ev, k, chunk=chunk)
    sweep(ev, consumer)
    (gv, gi), g_fold = consumer.result()
    assert hv.dtype == gv.dtype and hi.dtype == gi.dtype and gv.shape == (len(ev.query), k)
    assert np.array_equal(gv, hv) and np.array_equal(gi, hi)
    assert np.array_equal(g_fold, by_fold)
    assert g_fold.sum() == ev.total_pairs and (g_fold.sum(axis=(1, 2)) > 0).all()  # every pair once, every fold used


@pytest.mark.parametrize("split", [{}, {"query": np.arange(200), "gallery": np.arange(200, 600)}], ids=["loo", "query/gallery"])
def test_lists_do_not_depend_on_the_order_the_blocks_come_in(split):
    """Blocks given last to first (a tie at a list's end now meets the lower index later): the same lists."""
    x, labels = quantised()
    ev = Evaluation(x, labels, block=64, **split)
    (hv, hi), _ = numba_pass(ev, 20, True, False)
    blocks = []
    with on_the_cpu():
        allpairs._sweep(ev, 1, lambda S, r0, c0, diagonal, split: blocks.append((S.copy(), r0, c0, diagonal)))
    consumer = block_consumer(ev, 20, hist=False)
    for S, r0, c0, diagonal in reversed(blocks):
        consumer.consume(torch.from_numpy(S), r0, c0, diagonal)
    (gv, gi), _ = consumer.result()
    assert np.array_equal(gv, hv) and np.array_equal(gi, hi)


def test_boundary_ties_are_common_in_the_tied_cases():
    """The tie fallback is exercised: many lists end inside a run of equal similarities."""
    for data, k in ((duplicated, 10), (quantised, 20)):
        x, _ = data()
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        top = -np.sort(-s, axis=1)
        assert (top[:, k] == top[:, k - 1]).mean() > 0.1


def test_lists_alone_and_histogram_alone_equal_the_numba_kernels():
    x, labels = duplicated()
    ev = Evaluation(x, labels, block=128)
    for knn, hist in ((True, False), (False, True)):
        (hv, hi), by_fold = numba_pass(ev, 7, knn, hist)
        consumer = block_consumer(ev, 7, knn, hist)
        sweep(ev, consumer)
        (gv, gi), g_fold = consumer.result()
        assert np.array_equal(gv, hv) and np.array_equal(gi, hi) and gv.shape == (len(x), 7 if knn else 1)
        assert np.array_equal(g_fold, by_fold) if hist else g_fold.shape == (ev.folds, 2, 1) and not g_fold.any()


def numba_on_block(S, labels, k, monkeypatch):
    """The numba path on one hand-made leave-one-out diagonal block S (folds=1): its lists and histogram."""
    n = len(S)
    ev = Evaluation(normalised(np.ones((n, 4))), labels, folds=1, block=n)

    def one_block(ev, threads, consume, fold_done=None):
        consume(S, 0, 0, True, lambda rows, work: work(0, rows, 0))
        if fold_done:
            fold_done(0)

    with monkeypatch.context() as patch:
        patch.setattr(allpairs, "_sweep", one_block)
        return numba_pass(ev, k)


def test_signed_zeros_ties_and_bin_edges_equal_the_numba_kernels(monkeypatch):
    """A hand-made block: -0.0 beside 0.0 (equal, so the index decides), runs of equal values, and scores at every
    kind of bin edge (both sides of bin boundaries, tiny values either side of 0, beyond [-1, 1])."""
    rng = np.random.default_rng(0)
    edges = allpairs._key_value(allpairs._first_key(rng.integers(0, BINS, 60)))
    special = np.array([0.0, -0.0, 2.0**-54, -(2.0**-54), -(2.0**-53), 2.0**-30, -(2.0**-30), 1e-45, -1e-45, 1.0, -1.0, 1.003, -1.003], np.float32)
    values = np.concatenate([edges, np.nextafter(edges, np.float32(-2)), np.nextafter(edges, np.float32(2)), special])
    values = np.concatenate([values, -values, np.zeros(40, np.float32), -np.zeros(40, np.float32), np.full(40, 0.25, np.float32)])
    n = 64
    S = rng.choice(values, (n, n)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    for k in (1, 5, 40, 63):
        (hv, hi), by_fold_numba = numba_on_block(S, labels, k, monkeypatch)
        consumer = gpu_pass.BlockConsumer(labels, labels, k=k, knn=True, hist=True, folds=1, loo=True, bins=BINS, empty=_WORST, device="cpu", chunk=SMALL_CHUNK)
        consumer.consume(torch.from_numpy(S), 0, 0, True)
        consumer.fold_done(0)
        (gv, gi), by_fold = consumer.result()
        assert np.array_equal(gi, hi) and np.array_equal(gv.view(np.int32), hv.view(np.int32)), k  # the very bits
        assert np.array_equal(by_fold, by_fold_numba) and by_fold.sum() == n * (n - 1) // 2
    assert (S == 0).sum() > 100 and (np.signbit(S) & (S == 0)).sum() > 50


def test_bins_are_the_kernels_bins_for_every_kind_of_float():
    """``_bin`` against the kernel's formula, in float64 with truncation, on scores at and beside every bin edge."""
    bins = np.concatenate([np.arange(0, BINS + 1, 61), np.arange(BINS // 2 - 100, BINS // 2 + 100), [1, BINS - 1, BINS]])
    keys = allpairs._first_key(bins)
    keys = np.concatenate([keys + d for d in (-2, -1, 0, 1)])
    tiny = np.ldexp(1.0, np.arange(-149, 1)).astype(np.float32)
    s = np.concatenate([allpairs._key_value(keys[np.abs(keys) < 0x7F800000]), tiny, -tiny, np.nextafter(tiny, np.float32(0)), -np.nextafter(tiny, np.float32(0))])
    kernel = np.clip(np.trunc((s.astype(np.float64) + 1.0) * (BINS / 2)), 0, BINS - 1).astype(np.int64)
    got = gpu_pass._bin(torch.from_numpy(s), BINS, gpu_pass._half(BINS, "cpu")).numpy()
    assert np.array_equal(got, kernel) and np.array_equal(got, allpairs._bin_of(s))
    assert got.dtype == np.int32 and np.isin(np.minimum(bins, BINS - 1), got).all()  # every bin tried, from both sides


def test_order_key_orders_as_the_heaps_do():
    values = torch.tensor([0.5, 0.5, -0.0, 0.0, -3.0, -3.0, 1.0, -1.0, float("-inf")])
    index = torch.tensor([7, 2, 1, 4, torch.iinfo(torch.int64).max, 3, 9, 0, 5])
    order = torch.argsort(gpu_pass._order_key(values, index), descending=True)
    expected = sorted(range(9), key=lambda j: (-values[j].item(), index[j].item()))  # -0.0 == 0.0: the index decides
    assert order.tolist() == expected


# ---- the recount pass -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["quantised", "near zero", "near zero, query/gallery"])
def test_recount_equals_the_numba_kernel(case, monkeypatch):
    """Every pass that splits heavy bins, run both ways on the same ranges: identical counts and key ranges."""
    x, labels = quantised() if case == "quantised" else near_zero()
    split = {"query": np.arange(0, 150, 4), "gallery": np.setdiff1d(np.arange(150), np.arange(0, 150, 4))} if "query" in case else {}
    ev = Evaluation(x, labels, block=96, **split)
    calls = []
    original = allpairs._recount

    def both(ev, bins, lo, hi):
        expected = original(ev, bins, lo, hi)
        calls.append((expected, recount_on_device(ev, bins, lo, hi), recount_on_device(ev, bins, lo, hi, chunk=SMALL_CHUNK)))
        return expected

    monkeypatch.setattr(allpairs, "_recount", both)
    allpairs.block_pass(ev, 1, False, True)
    assert len(calls) >= (1 if case == "quantised" else 2)  # near zero: bins split, then split again
    for expected, got, got_small in calls:
        assert len(expected[0]) > 0
        for e, g, s in zip(expected, got, got_small):
            assert np.array_equal(e, g) and np.array_equal(e, s)


# ---- the metrics end to end -----------------------------------------------------------------------


END_TO_END = {
    "duplicates": (duplicated, {}),
    "quantised, query/gallery": (quantised, {"query": np.arange(200), "gallery": np.arange(200, 600)}),
    "near zero": (near_zero, {}),
}


@pytest.mark.parametrize("case", list(END_TO_END))
def test_metrics_are_the_same_through_the_device_pass(case, monkeypatch):
    data, split = END_TO_END[case]
    x, labels = data()
    expected = evaluate_embeddings(x, labels, block=128, **split)
    monkeypatch.setattr(allpairs, "block_pass", block_pass_on_device)
    monkeypatch.setattr(allpairs, "_recount", recount_on_device)
    got = evaluate_embeddings(x, labels, block=128, **split)
    assert got.values == expected.values and "roc_auc" in got.values and "map@r" in got.values
    ours, theirs = got.evaluation.pair_counts(), expected.evaluation.pair_counts()
    assert all(np.array_equal(getattr(ours, f), getattr(theirs, f)) for f in ("thresholds", "positive", "negative"))


# ---- on the GPU (pytest -m gpu; MLTK_GPU_TEST_DEVICE=cpu for a dry run on the CPU) ---------------------
#
# The blocks are computed as on the CPU (``on_the_cpu``) and moved to the device: the numba side stays the
# numba kernels, however metrics.py wires the device pass in, and both sides see the same similarities.

DEVICE = os.environ.get("MLTK_GPU_TEST_DEVICE", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_on_the_device_lists_histograms_and_recounts_equal_the_numba_kernels(compile, monkeypatch):
    for case in ("duplicates", "quantised, query/gallery, small chunks"):
        data, split, block, k, chunk = CASES[case]
        x, labels = data()
        ev = Evaluation(x, labels, block=block, **split)
        (hv, hi), by_fold = numba_pass(ev, k)
        consumer = block_consumer(ev, k, chunk=chunk, device=DEVICE, compile=compile)
        sweep(ev, consumer)
        (gv, gi), g_fold = consumer.result()
        assert np.array_equal(gv, hv) and np.array_equal(gi, hi) and np.array_equal(g_fold, by_fold), case
    calls = []
    original = allpairs._recount
    monkeypatch.setattr(allpairs, "_recount", lambda ev, *args: calls.append((original(ev, *args), recount_on_device(ev, *args, device=DEVICE))) or calls[-1][0])
    with on_the_cpu():
        allpairs.block_pass(Evaluation(*near_zero(), block=96), 1, False, True)
    assert len(calls) >= 2 and all(np.array_equal(e, g) for expected, got in calls for e, g in zip(expected, got))


@pytest.mark.gpu
def test_on_the_gpu_a_block_needs_at_most_16_bytes_an_element_of_a_chunk_beyond_itself():
    if not DEVICE.startswith("cuda"):
        pytest.skip("peak memory is measured on a CUDA device")
    n, chunk = 4096, 1 << 22
    x, labels = quantised(n)  # ties everywhere: every list ends in one, and the exact selection runs
    q = torch.from_numpy(x).to(DEVICE)
    blocks = [(q[:n // 2] @ q[:n // 2].T, 0, 0, True), (q[:n // 2] @ q[n // 2 :].T, 0, n // 2, False)]
    consumer = gpu_pass.BlockConsumer(labels, labels, k=20, knn=True, hist=True, folds=1, loo=True, bins=BINS, empty=_WORST, device=DEVICE, chunk=chunk)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for S, r0, c0, diagonal in blocks:
        consumer.consume(S, r0, c0, diagonal)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert 4 * chunk < extra <= 16 * chunk + (1 << 20), extra / chunk  # the histogram's 12 bytes, at least, and no more than stated


def test_a_count_that_fails_to_compile_falls_back_to_the_same_counts(monkeypatch):
    import torch._dynamo.exc

    def refuses(function, dynamic):
        def compiled(*args):
            raise torch._dynamo.exc.TorchDynamoException("no compiler for this device")

        return compiled

    x, labels = clustered(n=300)
    ev = Evaluation(x, labels, block=128)
    eager = block_consumer(ev, k=8)
    sweep(ev, eager)
    monkeypatch.setattr(torch, "compile", refuses)
    fallen_back = block_consumer(ev, k=8, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        sweep(ev, fallen_back)
    assert np.array_equal(fallen_back.result()[1], eager.result()[1]) and eager.result()[1].sum() == 300 * 299 // 2


def test_metrics_wire_the_device_pass_in_where_it_runs(monkeypatch):
    """metrics' own dispatch (as on a GPU, here on CPU tensors): the same values and counts as the numba kernels."""
    used = []
    for consumer in (gpu_pass.BlockConsumer, gpu_pass.RecountConsumer):
        consume = consumer.consume
        monkeypatch.setattr(consumer, "consume", lambda self, S, *a, _c=consume: used.append((type(self).__name__, type(S))) or _c(self, S, *a))
    for data in (quantised, near_zero):  # ties everywhere; heavy bins split by the recount pass (in both)
        x, labels = data()
        expected = evaluate_embeddings(x, labels)
        assert not used
        with monkeypatch.context() as patch:
            patch.setattr(allpairs, "_torch_pass", lambda device: True)
            got = evaluate_embeddings(x, labels)
        assert got.values == expected.values
        ours, theirs = got.evaluation.pair_counts(), expected.evaluation.pair_counts()
        assert all(np.array_equal(getattr(ours, f), getattr(theirs, f)) for f in ("thresholds", "positive", "negative"))
        assert {kind for _, kind in used} == {torch.Tensor} and "RecountConsumer" in {name for name, _ in used}
        used.clear()
