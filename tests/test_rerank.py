"""Re-ranking of retrieval lists (mltk.rerank): hand-worked k-reciprocal sets, agreement with a dense
reference of the original algorithm, query expansion and DBA worked out on paper, specs, limits."""

import re

import numpy as np
import pytest

from mltk import knn, rerank
from mltk.errors import MltkError, UsageError


def on_circle(degrees) -> np.ndarray:
    """Unit vectors in 2-D at these angles: for angles within 180 degrees, nearer angle = higher cosine."""
    a = np.radians(np.asarray(degrees, np.float64))
    return np.stack([np.cos(a), np.sin(a)], -1).astype(np.float32)


def exact(queries, gallery, k, own=None):
    return knn.neighbours(knn.build(gallery), queries, k, own=own, gallery=gallery)


def rows(m) -> list[set[int]]:
    """A CSR matrix's rows as sets of columns."""
    return [set(m.indices[m.indptr[i] : m.indptr[i + 1]].tolist()) for i in range(m.shape[0])]


# Eight items at these angles (degrees). Their neighbours, nearest first (distances in degrees):
#   0 (0):  1(1)  2(8)  3(11) 4(17) 5(42) 6(60) | 7(65)
#   1 (1):  0(1)  2(7)  3(10) 4(16) 5(41) 6(59) | 7(64)
#   2 (8):  3(3)  1(7)  0(8)  4(9)  5(34) 6(52) | 7(57)
#   3 (11): 2(3)  4(6)  1(10) 0(11) 5(31) 6(49) | 7(54)
#   4 (17): 3(6)  2(9)  1(16) 0(17) 5(25) 6(43) | 7(48)
#   5 (42): 6(18) 7(23) 4(25) 3(31) 2(34) 1(41) | 0(42)
#   6 (60): 7(5)  5(18) 4(43) 3(49) 2(52) 1(59) | 0(60)
#   7 (65): 6(5)  5(23) 4(48) 3(54) 2(57) 1(64) | 0(65)
# k1 = 6 (half: 3). N(x, 6) is x and all but its farthest (after the bar): 0-4 leave out 7, 5-7 leave out 0.
# h in N(x, 6) is k-reciprocal when x is not h's farthest either:
#   R(0, 6) = {0,1,2,3,4} (0 is the farthest of 5 and 6);  R(1..4, 6) = {0..6};
#   R(5, 6) = R(6, 6) = {1..7};  R(7, 6) = {5,6,7} (7 is the farthest of 1-4).
# N(x, 3), x and its first three: 0:{0,1,2,3} 1:{1,0,2,3} 2:{2,3,1,0} 3:{3,2,4,1} 4:{4,3,2,1} 5:{5,6,7,4} 6:{6,7,5,4} 7:{7,6,5,4}
#   R(0,3) = {0,1,2} (0 is not in N(3,3));  R(1,3) = R(2,3) = {0,1,2,3};  R(3,3) = {1,2,3,4};
#   R(4,3) = {3,4} (4 is in neither N(2,3) nor N(1,3));  R(5..7, 3) = {5,6,7} (5 is not in N(4,3)).
# R*: add R(q,3) for q in R(x,6) when more than 2/3 of it is in R(x,6).
#   x = 5, 6: R(1,3) = {0,1,2,3} has 3 of 4 in {1..7} (3 > 8/3): 0 is added, R* = {0..7}.
#   x = 1..4: R(5,3) = R(6,3) = {5,6,7} has 2 of 3 in {0..6} (2 > 2 fails): 7 is not added, R* = {0..6}.
#   x = 0, 7: every R(q,3) already lies in R(x,6): R* = R(x,6).
ANGLES = [0, 1, 8, 11, 17, 42, 60, 65]
HAND_NEIGHBOURS = [
    [0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 2, 3, 4, 5, 6, 7], [2, 3, 1, 0, 4, 5, 6, 7], [3, 2, 4, 1, 0, 5, 6, 7],
    [4, 3, 2, 1, 0, 5, 6, 7], [5, 6, 7, 4, 3, 2, 1, 0], [6, 7, 5, 4, 3, 2, 1, 0], [7, 6, 5, 4, 3, 2, 1, 0],
]
R6 = [{0, 1, 2, 3, 4}, *[set(range(7))] * 4, *[set(range(1, 8))] * 2, {5, 6, 7}]
R3 = [{0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3}, {1, 2, 3, 4}, {3, 4}, {5, 6, 7}, {5, 6, 7}, {5, 6, 7}]
RSTAR = [{0, 1, 2, 3, 4}, *[set(range(7))] * 4, set(range(8)), set(range(8)), {5, 6, 7}]


def test_gallery_neighbours_of_the_hand_worked_example_are_the_table():
    x = on_circle(ANGLES)
    c = rerank.Candidates(x[:0], x, np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64))
    sims, positions = c.gallery_neighbours(8)
    assert positions.tolist() == HAND_NEIGHBOURS
    assert np.allclose(sims, np.cos(np.radians(np.abs(np.subtract.outer(ANGLES, ANGLES))))[np.arange(8)[:, None], positions], atol=1e-6)
    assert c.gallery_neighbours(4)[1].tolist() == [r[:4] for r in HAND_NEIGHBOURS]  # sliced from the cache


def test_reciprocal_and_expanded_sets_are_the_hand_worked_ones():
    positions = np.array(HAND_NEIGHBOURS)
    assert rows(rerank.reciprocal_sets(positions, 6)) == R6
    assert rows(rerank.reciprocal_sets(positions, 3)) == R3
    assert rerank.half_of(6) == 3 and rerank.half_of(5) == 2 and rerank.half_of(7) == 4  # numpy's rounding, as the original
    assert rows(rerank.expanded_sets(positions, 6)) == RSTAR


def test_weights_are_normalised_exp_of_minus_the_distance():
    x = on_circle(ANGLES)
    v = rerank.reciprocal_features(rerank.expanded_sets(np.array(HAND_NEIGHBOURS), 6), x)
    assert np.allclose(np.asarray(v.sum(1)).ravel(), 1.0)
    for g in range(8):
        members = sorted(RSTAR[g])
        w = np.exp(-(1 - np.cos(np.radians(np.subtract(ANGLES[g], np.take(ANGLES, members))))) / 2)
        assert np.allclose(v[g].toarray()[0, members], w / w.sum(), atol=1e-6)
        assert v[g].nnz == len(members)
    qe = rerank.local_expansion(v, np.array(HAND_NEIGHBOURS), 2)  # mean of V over x and its nearest
    assert np.allclose(qe[2].toarray(), (v[2].toarray() + v[3].toarray()) / 2, atol=1e-7)


# ---- agreement with the original algorithm, written densely ----


def dense_original(x, k1, k2, lam):
    """zhunzhong07/person-re-ranking's re_ranking over all items as probes and gallery, d = (1 - cos) / 2: the N x N distance."""
    n = len(x)
    dist = (1 - x @ x.T) / 2
    np.fill_diagonal(dist, 0)
    rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(rank, i, k1)
        expanded = r
        for q in r:
            rq = reciprocal(rank, q, int(np.around(k1 / 2)))
            if len(np.intersect1d(rq, r)) > 2 / 3 * len(rq):
                expanded = np.append(expanded, rq)
        expanded = np.unique(expanded)
        v[i, expanded] = np.exp(-dist[i, expanded]) / np.exp(-dist[i, expanded]).sum()
    vqe = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    shared = np.minimum(vqe[:, None, :], vqe[None, :, :]).sum(-1)
    return (1 - lam) * (1 - shared / (2 - shared)) + lam * dist, (v, vqe), rank


def reciprocal(rank, i, k):
    forward = rank[i, : k + 1]
    return forward[np.where(rank[forward, : k + 1] == i)[0]]


def dense_outside(gallery, queries, k1, k2, lam):
    """The U = gallery ∪ {p} definition for each query p: the gallery's sets among itself, p's own in U; distances (nq, ng)."""
    _, (v, vqe_gallery), rank = dense_original(gallery, k1, k2, lam)
    gdist = (1 - gallery @ gallery.T) / 2
    half = [reciprocal(rank, g, int(np.around(k1 / 2))) for g in range(len(gallery))]
    out = []
    for p in queries:
        dp = (1 - gallery @ p) / 2
        nearest = np.argsort(dp, kind="stable")
        # h in N(p, k1) is k-reciprocal when fewer than k1 other gallery items are nearer to h than p is
        r = np.array([h for h in nearest[:k1] if (gdist[h] < dp[h]).sum() - 1 < k1], int)
        expanded = r
        for q in r:
            if len(np.intersect1d(half[q], r)) > 2 / 3 * len(half[q]):
                expanded = np.append(expanded, half[q])
        expanded = np.unique(expanded)
        vp = np.zeros(len(gallery) + 1)  # the last column is p
        vp[expanded], vp[-1] = np.exp(-dp[expanded]), 1.0
        vp /= vp.sum()
        vqe = (vp + np.pad(v, ((0, 0), (0, 1)))[nearest[: k2 - 1]].sum(0)) / k2
        shared = np.minimum(vqe[None], np.pad(vqe_gallery, ((0, 0), (0, 1)))).sum(1)
        out.append((1 - lam) * (1 - shared / (2 - shared)) + lam * dp)
    return np.array(out)


def clustered(n, classes, dim, seed, spread=0.6):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.normal(size=(classes, dim))[labels] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (7, 8, 0.5), (6, 1, 0.1), (1, 2, 0.3)])
def test_leave_one_out_order_is_the_original_algorithms(k1, k2, lam):
    x, _ = clustered(60, 6, 16, seed=0)
    n = len(x)
    sims, positions = exact(x, x, n - 1, own=np.arange(n))
    c = rerank.Candidates(x, x, sims, positions, own=np.arange(n))
    new_s, new_p = rerank.KReciprocal(k1, k2, lam, candidates=n - 1)(c)
    reference, _, _ = dense_original(x.astype(np.float64), k1, k2, lam)
    for i in range(n):
        assert new_p[i].tolist() == [j for j in np.argsort(reference[i], kind="stable") if j != i]
    assert np.allclose(new_s, np.einsum("nd,nkd->nk", x, x[new_p]), atol=1e-5)  # the plain cosine, in the new order
    assert not (new_p == np.arange(n)[:, None]).any()


def test_queries_outside_the_gallery_follow_the_dense_reference():
    x, _ = clustered(70, 5, 12, seed=1)
    queries, gallery = x[:10], x[10:]
    sims, positions = exact(queries, gallery, len(gallery))
    c = rerank.Candidates(queries, gallery, sims, positions)
    _, new_p = rerank.KReciprocal(8, 4, 0.3, candidates=len(gallery))(c)
    reference = dense_outside(gallery.astype(np.float64), queries.astype(np.float64), 8, 4, 0.3)
    assert new_p.tolist() == np.argsort(reference, axis=1, kind="stable").tolist()
    assert not (new_p == positions).all()  # the re-ranking changed something


def test_only_the_first_candidates_are_reordered_and_the_gallery_is_searched_when_lists_are_short():
    x, _ = clustered(70, 5, 12, seed=1)
    queries, gallery = x[:10], x[10:]
    sims, positions = exact(queries, gallery, 30)
    long = rerank.KReciprocal(8, 4, 0.3, candidates=12)(rerank.Candidates(queries, gallery, sims, positions))
    short = rerank.KReciprocal(8, 4, 0.3, candidates=12)(rerank.Candidates(queries, gallery, sims[:, :5], positions[:, :5]))
    assert (long[1][:, 12:] == positions[:, 12:]).all()
    assert all(set(a) == set(b) for a, b in zip(long[1][:, :12].tolist(), positions[:, :12].tolist()))
    assert short[1].shape == (10, 5)  # 8 nearest searched for N(p, k1); the 5 at hand re-ordered
    assert all(set(a) == set(b) for a, b in zip(short[1].tolist(), positions[:, :5].tolist()))


# A query of class A whose nearest neighbour is of class B (angles in degrees):
#   A: 0 1 2 3        B: 24 24.5 ... 27.5 (eight)        query (A): 13.6
# Nearest to the query: 24 (10.4), then 3 (10.6), 24.5 (10.9), 25 (11.4).  With k1 = 4:
#   3's four nearest are 2, 1, 0 and (before 24 at 21) the query: the query would enter them -> reciprocal;
#   24's four nearest are 24.5 25 25.5 26, all nearer than the query: not reciprocal (nor any other B).
# So R(query) = {query, 3} and the query shares weight only with A's sets: every A item gets a Jaccard
# distance below 1 and every B item exactly 1, and 0.7 * 1 outweighs 0.3 * d for any d here.
def test_reciprocal_structure_corrects_a_wrong_first_neighbour():
    a, b = [0, 1, 2, 3], list(np.arange(24, 28, 0.5))
    gallery, labels = on_circle(a + b), np.array([0] * 4 + [1] * 8)
    query = on_circle([13.6])
    sims, positions = exact(query, gallery, len(gallery))
    assert labels[positions[0, 0]] == 1 and positions[0, 1] == 3
    new_s, new_p = rerank.KReciprocal(4, 1, 0.3, candidates=12)(rerank.Candidates(query, gallery, sims, positions))
    assert labels[new_p[0, :4]].tolist() == [0, 0, 0, 0] and new_p[0, 0] == 3
    assert np.isclose(new_s[0, 0], np.cos(np.radians(10.6)), atol=1e-6)  # still the plain cosine


# ---- query expansion ----


def test_query_expansion_weights_neighbours_by_similarity_to_the_alpha():
    # q at 0 deg; its two nearest at 20 deg (s = 0.93969) and -45 deg (s = 0.70711); alpha = 3:
    # q + 0.82976 (0.93969, 0.34202) + 0.35355 (0.70711, -0.70711) = (2.02972, 0.03380): angle 0.95404 deg
    around = on_circle([[20, -45]])
    new = rerank.expand(on_circle([0]), np.array([[0.93969, 0.70711]]), around, 3.0)
    assert np.allclose(new, [[np.cos(np.radians(0.95404)), np.sin(np.radians(0.95404))]], atol=1e-5)
    # a neighbour with a negative similarity counts 0 (clipped); alpha = 0 weighs every neighbour 1:
    # (1, 0) + 1 (0, 1) points at 45 deg
    assert np.allclose(rerank.expand(on_circle([0]), np.array([[-0.5]]), on_circle([[120]]), 3.0), on_circle([0]))
    assert np.allclose(rerank.expand(on_circle([0]), np.array([[0.0]]), on_circle([[90]]), 0.0), on_circle([45]), atol=1e-6)


def test_query_expansion_searches_again_and_returns_the_plain_cosine():
    # q at 0 deg; gallery a 20, b 25, c -22 (order a c b). n = 1, alpha = 3: q + 0.82976 a points at 9.06 deg,
    # from where b (16 away) is nearer than c (31 away): the new order is a b c.
    gallery, query = on_circle([20, 25, -22]), on_circle([0])
    sims, positions = exact(query, gallery, 3)
    assert positions.tolist() == [[0, 2, 1]]
    new_s, new_p = rerank.QueryExpansion(n=1, alpha=3.0)(rerank.Candidates(query, gallery, sims, positions))
    assert new_p.tolist() == [[0, 1, 2]]
    assert np.allclose(new_s, [np.cos(np.radians([20, 25, 22]))], atol=1e-6)


def test_dba_augments_the_gallery_and_searches_it():
    # alpha = 0, n = 1: each item becomes the bisector with its nearest: 0 -> 5 (with 10), 10 -> 5 (with 0), 50 -> 30 (with 10).
    gallery = on_circle([0, 10, 50])
    c = rerank.Candidates(on_circle([40]), gallery, *exact(on_circle([40]), gallery, 3))
    index = rerank.augmented_index(c, 1, 0.0)
    assert np.allclose(index.reconstruct_n(0, 3), on_circle([5, 5, 30]), atol=1e-6)
    # the query at 40 is expanded by the augmented 30 into 35, and searched among 5, 5, 30
    new_s, new_p = rerank.QueryExpansion(n=1, alpha=0.0, dba=True)(c)
    assert new_p[0, 0] == 2 and sorted(new_p[0, 1:]) == [0, 1]
    assert np.allclose(new_s[0], np.cos(np.radians(40 - np.array([0, 10, 50])[new_p[0]])), atol=1e-6)


@pytest.mark.parametrize("dba", [False, True])
def test_query_expansion_leave_one_out_never_returns_the_query(dba):
    x, _ = clustered(50, 5, 8, seed=2)
    own = np.arange(50)
    sims, positions = exact(x, x, 10, own=own)
    new_s, new_p = rerank.QueryExpansion(n=2, alpha=3.0, dba=dba)(rerank.Candidates(x, x, sims, positions, own=own))
    assert new_p.shape == (50, 10)
    assert not (new_p == own[:, None]).any()
    assert np.allclose(new_s, np.einsum("nd,nkd->nk", x, x[new_p]), atol=1e-6)


# ---- specs, limits, memory ----


def test_parse_spec():
    assert rerank.parse_spec("k-reciprocal") == ("k-reciprocal", {})
    assert rerank.parse_spec("k-reciprocal:k1=20,k2=6,lambda=0.3") == ("k-reciprocal", {"k1": 20, "k2": 6, "lambda": 0.3})
    name, params = rerank.parse_spec("qe: n=2, alpha=1e0")
    assert (name, params) == ("qe", {"n": 2, "alpha": 1.0}) and isinstance(params["n"], int) and isinstance(params["alpha"], float)
    assert rerank.parse_spec("x:a=true,b=FALSE") == ("x", {"a": True, "b": False})


@pytest.mark.parametrize("spec", ["", ":k1=2", "k-reciprocal:", "k-reciprocal:k1", "k-reciprocal:k1=", "k-reciprocal:k1=2,,k2=3",
                                  "k-reciprocal:k1=twenty", "k-reciprocal:k1=2,k1=3", "k1=20"])
def test_parse_spec_refuses_malformed_specs_in_one_line(spec):
    with pytest.raises(UsageError) as e:
        rerank.parse_spec(spec)
    message = str(e.value)
    assert repr(spec) in message and "NAME[:KEY=VALUE,...]" in message and "\n" not in message


@pytest.mark.parametrize("make, message", [
    (lambda: rerank.KReciprocal(k2=0), "k-reciprocal: k2 must be an integer from 1 to k1+1 (k1=20), got 0"),
    (lambda: rerank.KReciprocal(k1=4, k2=6), "k-reciprocal: k2 must be an integer from 1 to k1+1 (k1=4), got 6"),
    (lambda: rerank.KReciprocal(k1=0), "k-reciprocal: k1 must be an integer of at least 1, got 0"),
    (lambda: rerank.KReciprocal(k1=2.5), "k-reciprocal: k1 must be an integer of at least 1, got 2.5"),
    (lambda: rerank.KReciprocal(lam=1.5), "k-reciprocal: lambda must be a number in [0, 1], got 1.5"),
    (lambda: rerank.KReciprocal(candidates=0), "k-reciprocal: candidates must be an integer of at least 1, got 0"),
    (lambda: rerank.QueryExpansion(n=0), "qe: n must be an integer of at least 1, got 0"),
    (lambda: rerank.QueryExpansion(alpha=-1, dba=True), "dba: alpha must be a number of at least 0, got -1"),
    (lambda: rerank.QueryExpansion(n=True), "qe: n must be an integer of at least 1, got True"),
])
def test_parameters_are_checked_with_a_line_naming_them(make, message):
    with pytest.raises(UsageError) as e:
        make()
    assert str(e.value) == message


def test_check_memory_refuses_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(rerank, "available_memory", lambda: 12 * 2**30)
    rerank.check_memory(2**30, "this")
    with pytest.raises(MltkError) as e:
        rerank.check_memory(int(41.3 * 2**30), "k-reciprocal re-ranking of 2,000,000 gallery images", "lower k1 or use --rerank none")
    assert str(e.value) == (
        "k-reciprocal re-ranking of 2,000,000 gallery images needs about 41.3 GiB; 12.0 GiB are available: lower k1 or use --rerank none"
    )
    monkeypatch.setattr(rerank, "available_memory", lambda: None)
    rerank.check_memory(2**60, "anything")  # unknown: nothing to say


def test_k_reciprocal_checks_its_memory_before_it_allocates(monkeypatch):
    x, _ = clustered(40, 4, 8, seed=3)
    c = rerank.Candidates(x[:5], x[5:], *exact(x[:5], x[5:], 20))
    monkeypatch.setattr(rerank, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(rerank.Candidates, "gallery_neighbours", lambda *a: pytest.fail("allocated before the check"))
    with pytest.raises(MltkError, match=r"^k-reciprocal re-ranking of 35 gallery images needs about .* MiB are available: lower k1"):
        rerank.KReciprocal(k1=5, k2=2)(c)


def test_available_memory_is_read_from_the_system():
    value = rerank.available_memory()
    assert value is None or (isinstance(value, int) and value > 0)


def test_a_memmap_gallery_gives_the_same_lists(tmp_path):
    x, _ = clustered(60, 6, 16, seed=4)
    queries, gallery = x[:8], x[8:]
    np.save(tmp_path / "g.npy", gallery)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    sims, positions = exact(queries, gallery, 30)
    for method in (rerank.KReciprocal(k1=6, k2=3), rerank.QueryExpansion(n=2), rerank.QueryExpansion(n=2, dba=True)):
        in_memory = method(rerank.Candidates(queries, gallery, sims, positions))
        on_disk = method(rerank.Candidates(queries, mapped, sims, positions))
        assert (in_memory[1] == on_disk[1]).all() and np.allclose(in_memory[0], on_disk[0])


def test_no_rerank_and_the_leave_one_out_lists_give_the_searched_neighbours():
    x, _ = clustered(30, 3, 8, seed=5)
    own = np.random.default_rng(0).permutation(30)  # queries in another order than the gallery
    sims, positions = exact(x[own], x, 29, own=own)
    c = rerank.Candidates(x[own], x, sims, positions, own=own)
    assert rerank.NoRerank()(c) == (sims, positions) and rerank.NoRerank.candidates == 0
    from_lists = c.gallery_neighbours(6)
    searched = rerank.Candidates(x[:0], x, sims[:0], positions[:0]).gallery_neighbours(6)
    assert (from_lists[1] == searched[1]).all() and np.allclose(from_lists[0], searched[0], atol=1e-6)


# ---- the built-in registrations ----


def registered() -> dict:
    from mltk.default_plugins import rerankers

    found = {}
    rerankers.register_rerankers(register=lambda name, builder, description="": found.setdefault(name, (builder, description)))
    return found


def test_the_built_in_rerankers_build_from_spec_params():
    found = registered()
    assert sorted(found) == ["dba", "k-reciprocal", "none", "qe"] and all(d for _, d in found.values())
    kr = found["k-reciprocal"][0](**rerank.parse_spec("k-reciprocal:k1=10,k2=3,lambda=0.5,candidates=50")[1])
    assert (kr.k1, kr.k2, kr.lam, kr.candidates) == (10, 3, 0.5, 50)
    assert isinstance(found["none"][0](), rerank.NoRerank)
    qe, dba = found["qe"][0](n=2, alpha=1), found["dba"][0](n=4)
    assert (qe.n, qe.alpha, qe.dba, dba.n, dba.dba, qe.candidates) == (2, 1.0, False, 4, True, 2)


@pytest.mark.parametrize("name, params, message", [
    ("k-reciprocal", {"k3": 1}, "k-reciprocal takes k1, k2, lambda, candidates; got 'k3'"),
    ("k-reciprocal", {"lam": 0.2}, "k-reciprocal takes k1, k2, lambda, candidates; got 'lam'"),
    ("qe", {"k": 1}, "qe takes n, alpha; got 'k'"),
    ("dba", {"dba": True}, "dba takes n, alpha; got 'dba'"),
    ("none", {"k": 1}, "none takes no options; got 'k'"),
])
def test_a_builder_names_the_keys_it_takes(name, params, message):
    with pytest.raises(UsageError) as e:
        registered()[name][0](**params)
    assert str(e.value) == message


# ---- in the metrics, mltk evaluate and mltk search; a plugin's own re-ranker ---------------------------------


class Reversed:
    """A plugin's re-ranker: its candidates in reverse order (easy to tell from the search's)."""

    candidates = 4

    def __call__(self, c):
        return c.similarities[:, ::-1].copy(), c.positions[:, ::-1].copy()


def test_a_plugins_reranker_reorders_what_the_retrieval_metrics_read(plugin):
    import mltk
    from mltk.metrics import evaluate_embeddings

    class Plugin:
        @mltk.hookimpl
        def register_rerankers(self, register):
            register("reversed", lambda **params: Reversed(), description="the candidates backwards")

    plugin(Plugin(), "reversing")
    x = on_circle([0, 1, 2, 3, 90, 91, 92, 93])  # two classes of four: each item's 3 nearest are its class
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    plain = evaluate_embeddings(x, labels, metrics=["recall_at_k"], ks=(1,))
    backwards = evaluate_embeddings(x, labels, metrics=["recall_at_k", "roc_auc"], ks=(1,), rerank=rerank.create("reversed"))
    assert plain.values["recall@1"] == 1.0
    assert backwards.values["recall@1"] == 0.0  # the 4th nearest, first now, is of the other class for every item
    assert backwards.values["roc_auc"] == 1.0 and backwards.values["rerank_seconds"] >= 0  # pair scores are not re-ranked
    with pytest.raises(UsageError, match=r"unknown re-ranker 'reversd'; did you mean 'reversed'"):
        rerank.create("reversd")


class Misbehaving:
    """A plugin's re-ranker that does ``what`` to its lists (or raises, or returns something else)."""

    def __init__(self, what, candidates=4):
        self.what, self.candidates = what, candidates

    def __call__(self, c):
        return self.what(c.similarities.copy(), c.positions.copy())


def _with(sims, positions, row=(0, 0), sim=None, position=None):
    """The lists with one entry changed."""
    if sim is not None:
        sims[row] = sim
    if position is not None:
        positions[row] = position
    return sims, positions


def _raise(error):
    raise error


def misbehaving(plugin, what, candidates=4):
    """The re-ranker 'bad' of plugin 'misbehaving', registered for one test."""
    import mltk

    class Plugin:
        @mltk.hookimpl
        def register_rerankers(self, register):
            register("bad", lambda **params: Misbehaving(what, candidates))

    plugin(Plugin(), "misbehaving")


FAILED = "re-ranker 'bad' (plugin 'misbehaving') failed: "


@pytest.mark.parametrize("what, why", [
    (lambda s, p: _with(s, p, position=8), "it returned position 8, outside the gallery's 8 (0 to 7)"),
    (lambda s, p: _with(s, p, position=-1), "it returned position -1, outside the gallery's 8 (0 to 7)"),  # not the last item
    (lambda s, p: (s[:, :2], p[:, :2]), "it returned similarities of shape (8, 2); it was given lists of shape (8, 4) and returns lists as long"),
    (lambda s, p: (s, p[:5]), "it returned positions of shape (5, 4); it was given lists of shape (8, 4)"),
    (lambda s, p: _with(s, p, row=(3, 1), sim=np.nan), "it returned the similarity nan; a score is a finite cosine"),
    (lambda s, p: _with(s, p, sim=np.inf), "it returned the similarity inf"),
    (lambda s, p: (s, p.astype(np.float64)), "it returned positions of type float64, not whole numbers"),
    (lambda s, p: (s.astype(str), p), "it returned similarities of type <U"),
    (lambda s, p: _with(s, p, row=(2, 1), position=p[2, 0]), "it listed gallery item"),
    (lambda s, p: _with(s, p, row=(6, 3), position=6), "it listed query 6's own row (leave-one-out)"),
    (lambda s, p: None, "it returned a NoneType, not (similarities, positions)"),
    (lambda s, p: (s, p, p), "it returned a tuple of 3, not (similarities, positions)"),
    (lambda s, p: ([[0.5], [0.1, 0.2]], p), "ValueError: "),  # ragged lists
    (lambda s, p: _raise(ValueError("no lists today")), "ValueError: no lists today"),
    (lambda s, p: _raise(IndexError("index 99 is out of bounds")), "IndexError: index 99 is out of bounds"),
])
def test_what_a_plugins_reranker_returns_is_checked_and_a_failure_names_it(what, why, plugin):
    from mltk.metrics import evaluate_embeddings

    misbehaving(plugin, what)
    x = on_circle([0, 1, 2, 3, 90, 91, 92, 93])
    with pytest.raises(MltkError) as e:
        evaluate_embeddings(x, [0, 0, 0, 0, 1, 1, 1, 1], metrics=["recall_at_k"], ks=(1,), rerank=rerank.create("bad"))
    assert str(e.value).startswith(FAILED + why), str(e.value)


@pytest.mark.parametrize("candidates, why", [
    (None, "its candidates (how many nearest it re-orders) is None, not a whole number from 0"),
    (-1, "its candidates (how many nearest it re-orders) is -1, not a whole number from 0"),
    ("4", "its candidates (how many nearest it re-orders) is '4', not a whole number from 0"),
])
def test_a_plugins_reranker_with_no_count_of_candidates_is_refused_when_built(candidates, why, plugin):
    misbehaving(plugin, lambda s, p: (s, p), candidates)
    with pytest.raises(MltkError) as e:
        rerank.create("bad")
    assert str(e.value) == FAILED + why


def test_a_plugins_reranker_builder_that_raises_is_named_and_one_that_refuses_a_parameter_speaks_for_itself(plugin):
    import mltk

    def build(**params):
        if params:
            raise UsageError(f"bad takes no options; got {next(iter(params))!r}")
        return {}["k1"]

    class Plugin:
        @mltk.hookimpl
        def register_rerankers(self, register):
            register("bad", build)

    plugin(Plugin(), "misbehaving")
    with pytest.raises(MltkError) as e:
        rerank.create("bad")
    assert str(e.value) == FAILED + "KeyError: 'k1'"
    with pytest.raises(UsageError, match=r"^bad takes no options; got 'k'$"):
        rerank.create("bad:k=1")


def test_a_lack_of_memory_in_a_built_in_reranker_keeps_its_own_line(monkeypatch):
    from mltk.metrics import evaluate_embeddings

    x, labels = clustered(40, 4, 8, seed=3)
    monkeypatch.setattr(rerank, "available_memory", lambda: 1 << 20)
    with pytest.raises(MltkError, match=r"^k-reciprocal re-ranking of 40 gallery images needs about .* MiB are available: lower k1"):
        evaluate_embeddings(x, labels, metrics=["recall_at_k"], ks=(1,), rerank=rerank.create("k-reciprocal:k1=5,k2=2"))


def test_a_parameter_beyond_the_gallery_counts_as_the_gallery_in_the_memory_estimate(monkeypatch):
    x, _ = clustered(40, 4, 8, seed=3)
    c = rerank.Candidates(x[:5], x[5:], *exact(x[:5], x[5:], 20))
    whole = rerank.KReciprocal(k1=200, k2=3)  # k1 and k1/2 both past the gallery's 35
    for huge in (rerank.create("k-reciprocal:k1=1e300,k2=3"), rerank.create(f"k-reciprocal:k1=1{'0' * 400},k2=3")):
        assert huge.method.memory(c) == whole.memory(c) < 2**30
        got, expected = huge(c), whole(c)
        assert (got[1] == expected[1]).all() and np.allclose(got[0], expected[0])
    assert rerank.create("dba:n=1e300").method.memory(c) == rerank.QueryExpansion(n=35, dba=True).memory(c)
    monkeypatch.setattr(rerank, "available_memory", lambda: 1 << 20)
    with pytest.raises(MltkError) as e:
        rerank.create("k-reciprocal:k1=1e300")(c)
    assert re.fullmatch(r"k-reciprocal re-ranking of 35 gallery images needs about \d+\.\d MiB; 1\.0 MiB are available: lower k1 or use --rerank none", str(e.value)), str(e.value)


@pytest.mark.parametrize("spec, message", [
    (f"k-reciprocal:k1=20,k2=1{'0' * 400}", "k-reciprocal: k2 must be an integer from 1 to k1+1 (k1=20), got an integer of 1329 bits"),
    (f"k-reciprocal:k1=1{'0' * 400},k2=0", "k-reciprocal: k2 must be an integer from 1 to k1+1 (k1=an integer of 1329 bits), got 0"),
    (f"k-reciprocal:lambda=1{'0' * 400}", "k-reciprocal: lambda must be a number in [0, 1], got an integer of 1329 bits"),
    (f"qe:n=-1{'0' * 400}", "qe: n must be an integer of at least 1, got an integer of 1329 bits"),
])
def test_a_huge_parameter_is_named_in_a_short_line(spec, message):
    with pytest.raises(UsageError) as e:
        rerank.create(spec)
    assert str(e.value) == message
    assert rerank.create(f"qe:alpha=1{'0' * 400}").method.alpha > 1e300  # accepted, as a float


def test_evaluate_and_search_take_a_reranker(trained_run, tmp_path, mltk_main):
    import json

    from conftest import one_line_error

    from mltk import load

    run, folder = trained_run
    code, out, err = mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "eval", "--no-report", "--workers", "0", "--rerank", "k-reciprocal:k1=3,k2=2")
    assert code == 0, err
    values = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert values["rerank_seconds"] >= 0 and 0 <= values["map@r"] <= 1
    code, _, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--workers", "0")
    assert code == 0, err
    query = sorted(folder.glob("class_03/*.png"))[0]
    code, out, err = mltk_main("search", tmp_path / "index", query, "--k", "5", "--json", "--rerank", "qe:n=2")
    assert code == 0, err
    hits = json.loads(out)[0]["neighbours"]
    gallery = np.load(tmp_path / "index" / "embeddings.npy")
    paths = (tmp_path / "index" / "paths.txt").read_text().splitlines()
    q = load(run).embed([query])[0].numpy()
    for hit in hits:  # re-ranked or not, a hit's score is its cosine with the query
        assert hit["score"] == pytest.approx(float(gallery[paths.index(hit["path"])] @ q), abs=1e-5)
    for args, message in (
        (["--rerank", "k-reciprocal:k3=1"], "k-reciprocal takes k1, k2, lambda, candidates; got 'k3'"),
        (["--rerank", "k-reciprocal:k1"], "bad re-ranker 'k-reciprocal:k1'"),
        (["--rerank", "kreciprocal"], "unknown re-ranker 'kreciprocal'; did you mean 'k-reciprocal'"),
    ):
        assert message in one_line_error(mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "e2", *args))
        assert message in one_line_error(mltk_main("search", tmp_path / "index", query, *args))
    assert not (tmp_path / "e2").exists()
    (tmp_path / "index" / "embeddings.npy").unlink()  # allowed: a search without re-ranking does not read it
    assert "has no embeddings.npy" in one_line_error(mltk_main("search", tmp_path / "index", query, "--rerank", "qe"))
    assert mltk_main("search", tmp_path / "index", query)[0] == 0
    code, out, err = mltk_main("search", tmp_path / "index", query, "--rerank", "none", "--json")  # none reads nothing
    assert code == 0 and [hit["path"] for hit in json.loads(out)[0]["neighbours"]] == [hit["path"] for hit in json.loads(mltk_main("search", tmp_path / "index", query, "--json")[1])[0]["neighbours"]]


def test_evaluate_and_search_stop_at_a_plugins_reranker_that_fails(trained_run, tmp_path, mltk_main, plugin):
    from conftest import one_line_error

    run, folder = trained_run
    misbehaving(plugin, lambda s, p: _with(s, p, row=(slice(None), 0), position=-1) if len(p) > 1 else _with(s, p, sim=np.nan))
    code, _, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--workers", "0")
    assert code == 0, err
    error = one_line_error(mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "eval", "--workers", "0", "--rerank", "bad"), 1)
    assert error == f"error: {FAILED}it returned position -1, outside the gallery's 40 (0 to 39)"  # not recall read off the last image
    assert not (tmp_path / "eval").exists()
    query = sorted(folder.glob("class_03/*.png"))[0]
    error = one_line_error(mltk_main("search", tmp_path / "index", query, "--json", "--rerank", "bad"), 1)
    assert error == f"error: {FAILED}it returned the similarity nan; a score is a finite cosine"  # no NaN in the JSON
