"""Metrics against independent computations: brute-force numpy kNN, scikit-learn, pytorch-metric-learning."""

import numpy as np
import pytest
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve

import mltk
from mltk import allpairs, metrics
from mltk.errors import UsageError
from mltk.metrics import Pairs, evaluate_embeddings, roc_auc
from mltk.plugins import pm

RETRIEVAL = ["recall_at_k", "precision_at_k", "map_at_r"]
VERIFICATION = ["roc_auc", "tar_at_far", "eer", "accuracy_10fold"]


def normalised(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n=400, dim=16, classes=40, spread=1.5, seed=0):
    """Gaussian clusters on the sphere, with a few classes of a single image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:5] = classes + np.arange(5)  # five single-image classes
    centers = rng.standard_normal((classes + 5, dim))
    return normalised(centers[labels] + spread * rng.standard_normal((n, dim))), labels


def tied(n=300, dim=8, seed=1):
    """Vectors with four entries of +-1/2: every similarity is a multiple of 1/4, computed exactly, so ties abound."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    labels = rng.integers(0, 12, n)
    labels[:3] = [100, 101, 102]
    return x, labels


DATA = {"clustered": clustered, "random": lambda: clustered(spread=50.0, seed=3), "tied": tied}


def reference_retrieval(q, g, q_labels, g_labels, ks, loo):
    """recall@k, precision@k and MAP@R from a stable numpy sort of every query's similarities."""
    s = q @ g.T
    if loo:
        np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    values = {f"recall@{k}": [] for k in ks} | {f"precision@{k}": [] for k in ks} | {"map@r": []}
    excluded = 0
    for i in range(len(q)):
        r = int((g_labels == q_labels[i]).sum()) - loo
        if r == 0:
            excluded += 1
            continue
        hits = g_labels[order[i]] == q_labels[i]
        for k in ks:
            values[f"recall@{k}"].append(hits[:k].any())
            values[f"precision@{k}"].append(hits[:k].mean())
        precisions = [hits[: j + 1].sum() / (j + 1) for j in range(r) if hits[j]]
        values["map@r"].append(sum(precisions) / r)
    return {name: float(np.mean(v)) for name, v in values.items()}, excluded, order


def all_pairs(x, labels):
    i, j = np.triu_indices(len(x), 1)
    return np.einsum("ij,ij->i", x[i], x[j]), labels[i] == labels[j]


@pytest.mark.parametrize("engine", metrics.EXACT_ENGINES)
@pytest.mark.parametrize("data", sorted(DATA))
def test_retrieval_matches_brute_force(engine, data):
    x, labels = DATA[data]()
    ks = (1, 2, 4, 8, 16)
    result = evaluate_embeddings(x, labels, metrics=RETRIEVAL, ks=ks, engine=engine, block=64)
    expected, excluded, _ = reference_retrieval(x, x, labels, labels, ks, loo=True)
    assert {k: result.values[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert result.values["queries_excluded"] == excluded > 0
    assert result.values["queries"] == len(x) - excluded


@pytest.mark.parametrize("engine", metrics.EXACT_ENGINES)
def test_ties_are_broken_by_gallery_index(engine):
    x, labels = tied()
    ev = metrics.Evaluation(x, labels, engine=engine, block=50)
    nb = ev.neighbours()
    _, _, order = reference_retrieval(x, x, labels, labels, metrics.KS, loo=True)
    k = nb.indices.shape[1]
    assert k == max(np.bincount(labels)) - 1  # k reaches the largest R
    similarities = np.sort(x @ x.T, axis=1)[:, ::-1]
    assert (similarities[:, 1 : k + 1] == similarities[:, 2 : k + 2]).mean() > 0.5  # ties at most ranks
    np.testing.assert_array_equal(nb.indices, order[:, :k])


@pytest.mark.parametrize("engine", metrics.EXACT_ENGINES)
def test_identical_embeddings_rank_by_index(engine):
    x = np.full((200, 4), 0.5, np.float32)  # 200 copies of one vector: every similarity is exactly 1
    labels = np.arange(200) // 2
    nb = metrics.Evaluation(x, labels, engine=engine, block=64).neighbours()
    expected = [[j for j in range(200) if j != i][:8] for i in range(200)]
    np.testing.assert_array_equal(nb.indices, expected)


def test_map_at_r_and_precision_at_1_match_pytorch_metric_learning():
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = clustered(n=600, dim=32, classes=30, spread=2.0, seed=7)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    expected = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    values = evaluate_embeddings(x, labels, metrics=RETRIEVAL).values
    assert values["map@r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    assert values["recall@1"] == values["precision@1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)


@pytest.mark.parametrize("engine", metrics.EXACT_ENGINES)
def test_query_gallery_split(engine):
    x, labels = clustered(n=500, seed=2)
    rng = np.random.default_rng(0)
    is_query = rng.random(len(x)) < 0.3
    ks = (1, 2, 4, 8)
    expected, excluded, _ = reference_retrieval(x[is_query], x[~is_query], labels[is_query], labels[~is_query], ks, loo=False)
    for query, gallery in ((is_query, ~is_query), (np.flatnonzero(is_query), np.flatnonzero(~is_query))):
        values = evaluate_embeddings(x, labels, query=query, gallery=gallery, metrics=RETRIEVAL + ["roc_auc"], ks=ks, engine=engine, block=64).values
        assert {k: values[k] for k in expected} == pytest.approx(expected, abs=1e-12)
        assert values["queries_excluded"] == excluded and values["pairs"] == is_query.sum() * (~is_query).sum()
    s = x[is_query] @ x[~is_query].T
    same = labels[is_query][:, None] == labels[~is_query][None, :]
    assert values["roc_auc"] == pytest.approx(roc_auc_score(same.ravel(), s.ravel()), abs=1e-4)
    with pytest.raises(UsageError, match="share 1 items"):
        evaluate_embeddings(x, labels, query=[0, 1], gallery=[1, 2])
    same_set = evaluate_embeddings(x, labels, query=np.arange(len(x)), gallery=np.arange(len(x)), metrics=RETRIEVAL).values
    assert same_set == evaluate_embeddings(x, labels, metrics=RETRIEVAL).values


@pytest.mark.parametrize("data", sorted(DATA))
def test_all_pairs_auc_matches_sklearn(data):
    x, labels = DATA[data]()
    scores, same = all_pairs(x, labels)
    values = evaluate_embeddings(x, labels, metrics=["roc_auc"], block=64).values
    assert values["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-4)
    assert (values["pairs"], values["pairs_positive"], values["pairs_sampled"]) == (len(same), same.sum(), 0)


def test_all_pairs_of_many_tied_scores_match_sklearn_exactly():
    x, labels = tied(n=400, dim=6)  # similarities take only a few values: every bin is a tie
    scores, same = all_pairs(x, labels)
    assert len(np.unique(scores)) < 10
    values = evaluate_embeddings(x, labels, metrics=["roc_auc"]).values
    assert values["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)


def sklearn_eer(fpr, tpr):
    """Where the ROC polyline (parametrised by point number) crosses fpr = 1 - tpr."""
    u = np.arange(len(fpr))
    at = brentq(lambda t: np.interp(t, u, fpr) + np.interp(t, u, tpr) - 1, 0, len(fpr) - 1)
    return float(np.interp(at, u, fpr))


def random_pairs(data: str, n: int, seed: int):
    """The embeddings of ``data`` and ``n`` pairs of them drawn at random: (x, labels, first, second, same)."""
    x, labels = DATA[data]()
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(x), n), rng.integers(0, len(x), n)
    return x, labels, first, second, labels[first] == labels[second]


@pytest.mark.parametrize("data", sorted(DATA))
def test_explicit_pairs_match_sklearn(data):
    x, labels, first, second, same = random_pairs(data, 3000, seed=5)
    pairs = Pairs.from_indices(x, first, second, same)
    result = evaluate_embeddings(x, labels, pairs=pairs, metrics=VERIFICATION, fars=(0.1, 0.01, 0.005), min_false_accepts=0)  # every FAR: the ROC's arithmetic
    scores = np.einsum("ij,ij->i", x[first], x[second])
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    full = result.evaluation.roc()
    np.testing.assert_allclose(full.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(full.tpr, tpr, atol=1e-12)
    assert result.values["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    for far in (0.1, 0.01, 0.005):
        assert result.values[f"tar@far={far:g}"] == pytest.approx(tpr[fpr <= far].max(), abs=1e-12)
    assert result.values["eer"] == pytest.approx(sklearn_eer(fpr, tpr), abs=1e-9)
    assert result.values["pairs"] == 3000 and result.values["pairs_sampled"] == 0
    thinned = result.roc  # the curve for plots: fewer points on the same polyline
    assert set(zip(thinned.fpr, thinned.tpr)) <= set(zip(full.fpr, full.tpr))
    assert len(thinned.fpr) < len(fpr) or data == "tied"  # nine distinct scores: no point is on a straight line
    assert np.trapezoid(thinned.tpr, thinned.fpr) == pytest.approx(result.values["roc_auc"], abs=1e-12)


def test_hand_made_scores_give_the_rates_worked_out_by_hand():
    # 4 positives; 100 negatives, one scoring 0.85 (a false accept rate of exactly 1/100) and 99 below 0.1.
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.85, *np.linspace(-0.5, 0.05, 99)])
    same = np.arange(len(scores)) < 4
    values = evaluate_embeddings(None, pairs=Pairs(scores, same), metrics=VERIFICATION[:3], fars=(0.01, 0.001), min_false_accepts=0).values
    assert values["tar@far=0.01"] == 1.0 and values["tar@far=0.001"] == 0.25
    assert values["roc_auc"] == (100 + 3 * 99) / 400
    assert values["eer"] == pytest.approx(0.01) and values["eer_threshold"] == 0.2


def reference_cv_accuracy(scores, same, folds, balanced=False):
    """For each fold: the threshold (a training score, "same if score >= t", or +inf) with the best
    training accuracy, the highest among equals; accuracy on the held-out fold. ``balanced``: the mean of
    TAR and TNR instead (compared exactly, as integers), over the folds with pairs of both kinds."""
    def right(t, s, y):
        accepted, rejected = int((s[y] >= t).sum()), int((s[~y] < t).sum())
        return accepted * int((~y).sum()) + rejected * int(y.sum()) if balanced else accepted + rejected

    def rate(t, s, y):
        return ((s[y] >= t).mean() + (s[~y] < t).mean()) / 2 if balanced else ((s >= t) == y).mean()

    accuracies = []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        if balanced and not all(part.any() for part in (same[train], ~same[train], same[test], ~same[test])):
            continue
        candidates = [np.inf] + sorted(set(scores[train]), reverse=True)
        best = max(candidates, key=lambda t: (right(t, scores[train], same[train]), t))
        accuracies.append(rate(best, scores[test], same[test]))
    return np.mean(accuracies), np.std(accuracies)


@pytest.mark.parametrize("positives", [300, 600])
@pytest.mark.parametrize("data", sorted(DATA))
def test_cross_validated_accuracy_matches_brute_force(data, positives):
    x, labels, first, second, same = random_pairs(data, 1200, seed=6)
    same = np.random.default_rng(0).permutation(1200) < positives  # a quarter: balanced accuracy; half, as in LFW's pairs.txt: plain accuracy
    folds = np.repeat(np.arange(10), 120)
    pairs = Pairs.from_indices(x, first, second, same, folds=folds)
    values = evaluate_embeddings(None, pairs=pairs).values
    balanced = positives == 300
    name = "balanced_accuracy" if balanced else "accuracy"
    mean, std = reference_cv_accuracy(pairs.scores, same, folds, balanced)
    assert (values[name], values[f"{name}_std"]) == pytest.approx((mean, std), abs=1e-12)
    assert ({"balanced_accuracy", "accuracy"} - {name}).isdisjoint(values)  # one of the two, never both
    assert set(values) >= {"roc_auc", "eer", name} and "recall@1" not in values  # no labels: no retrieval


def test_all_pairs_accuracy_uses_contiguous_folds():
    x, labels = clustered(n=120, classes=6, spread=1.0)
    scores, same = all_pairs(x, labels)
    i, _ = np.triu_indices(len(x), 1)
    pairs_before = np.concatenate([[0], np.cumsum(np.arange(len(x) - 1, -1, -1))])
    edges = np.searchsorted(pairs_before, pairs_before[-1] * np.arange(11) / 10)
    folds = np.searchsorted(edges[1:], i, side="right")  # fold of item i, for the pair i < j
    assert np.bincount(folds).min() > 0.9 * len(i) / 10
    values = evaluate_embeddings(x, labels, metrics=["accuracy_10fold"], block=16).values
    mean, std = reference_cv_accuracy(scores, same, folds, balanced=True)  # a sixth of the pairs are positives
    assert values["balanced_accuracy"] == pytest.approx(mean, abs=2e-3) and values["balanced_accuracy_std"] == pytest.approx(std, abs=2e-3)


def random_classes(n=600, classes=20, dim=32, seed=0):
    """Random unit vectors, labelled in classes of equal size: nothing to learn."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return normalised(x), np.repeat(np.arange(classes), n // classes)


def test_random_embeddings_over_all_pairs_give_balanced_accuracy_one_half():
    x, labels = random_classes()
    values = evaluate_embeddings(x, labels, metrics=["accuracy_10fold"]).values
    assert 1 - values["pairs_positive"] / values["pairs"] > 0.95  # calling every pair different would be "accurate" 95 % of the time
    assert "accuracy" not in values
    # Each fold tests ~870 positives: TAR's sd there is at most sqrt(0.25 / 870) = 0.017, the balanced accuracy's half that,
    # and the mean of 10 folds' ~0.003 (0.0032 measured over 20 seeds). 0.02 is six of those.
    assert values["balanced_accuracy"] == pytest.approx(0.5, abs=0.02)


def test_a_perfect_embedding_over_all_pairs_gives_balanced_accuracy_one():
    _, labels = random_classes()
    x = np.eye(20, dtype=np.float32)[labels]  # one vector per class: positives score 1, negatives 0
    values = evaluate_embeddings(x, labels, metrics=["accuracy_10fold"]).values
    assert values["balanced_accuracy"] == 1.0 and values["balanced_accuracy_std"] == 0.0
    assert 0.0 < values["balanced_accuracy_threshold"] <= 1.0


@pytest.mark.parametrize(("positives", "name"), [(300, "accuracy"), (330, "accuracy"), (331, "balanced_accuracy"), (270, "accuracy"), (269, "balanced_accuracy")])
def test_a_pair_list_keeps_plain_accuracy_while_neither_kind_is_over_55_percent(positives, name):
    # LFW's pairs.txt: 10 folds of 300 matched and 300 mismatched pairs; here 600 pairs, 10 folds, random scores.
    rng = np.random.default_rng(1)
    same = rng.permutation(600) < positives
    values = evaluate_embeddings(None, pairs=Pairs(rng.random(600), same, np.arange(600) % 10), metrics=["accuracy_10fold"]).values
    assert set(values) >= {name, f"{name}_std", f"{name}_threshold"}
    assert not ({"accuracy", "balanced_accuracy"} - {name}) & set(values)


def test_a_tar_at_a_far_the_negative_pairs_cannot_measure_is_none_with_the_reason():
    # 10 matched pairs scoring above 2 mismatched ones: the TAR at FAR 1e-4 "is" 1.0, from 2 negative pairs.
    scores, same = np.r_[np.linspace(0.6, 0.9, 10), 0.1, 0.2], np.arange(12) < 10
    result = evaluate_embeddings(None, pairs=Pairs(scores, same), metrics=["tar_at_far"])
    assert all(result.values[f"tar@far={far:g}"] is None for far in metrics.FARS)
    assert result.not_measured["tar@far=0.0001"] == (
        "2 negative pairs allow 0.0002 false accepts at FAR 0.0001, and a measured rate rests on 30 or more "
        "(Doddington's rule of 30): it takes 300,000 negative pairs"
    )
    assert set(result.not_measured) == {f"tar@far={far:g}" for far in metrics.FARS}
    everything = evaluate_embeddings(None, pairs=Pairs(scores, same), metrics=["tar_at_far"], min_false_accepts=0)
    assert everything.values["tar@far=0.0001"] == 1.0 and not everything.not_measured  # the number the rule withholds


@pytest.mark.parametrize(("negatives", "measured"), [(299, False), (300, True)])
def test_a_far_is_measured_from_30_false_accepts_on(negatives, measured):
    scores = np.r_[np.linspace(0.5, 0.9, 20), np.linspace(-0.5, 0.55, negatives)]
    same = np.arange(len(scores)) < 20
    result = evaluate_embeddings(None, pairs=Pairs(scores, same), metrics=["tar_at_far"], fars=(0.1,))
    assert (result.values["tar@far=0.1"] is not None) == measured and ("tar@far=0.1" not in result.not_measured) == measured


def test_sampled_pairs_fallback_is_reported_and_seeded():
    x, labels = clustered(n=400, classes=8, spread=1.2)
    total = len(x) * (len(x) - 1) // 2
    full = evaluate_embeddings(x, labels, metrics=["roc_auc"]).values
    sampled = evaluate_embeddings(x, labels, metrics=["roc_auc"], max_pairs=total - 1, sample_pairs=20_000, seed=1).values
    assert (sampled["pairs_sampled"], sampled["pairs"], sampled["pairs_total"]) == (1, 20_000, total)
    assert sampled["roc_auc"] == pytest.approx(full["roc_auc"], abs=0.01) and sampled["roc_auc"] != full["roc_auc"]
    again = evaluate_embeddings(x, labels, metrics=["roc_auc"], max_pairs=total - 1, sample_pairs=20_000, seed=1).values
    other = evaluate_embeddings(x, labels, metrics=["roc_auc"], max_pairs=total - 1, sample_pairs=20_000, seed=2).values
    assert again == sampled and other["roc_auc"] != sampled["roc_auc"]
    assert evaluate_embeddings(x, labels, metrics=["roc_auc"], max_pairs=total).values["pairs_sampled"] == 0


def test_sampled_pairs_never_pair_an_item_with_itself():
    x, _ = clustered(n=50)
    ev = metrics.Evaluation(x, np.arange(50), max_pairs=10, sample_pairs=5000)  # every class a single image
    with pytest.raises(metrics.NotApplicable, match="both positive and negative pairs"):
        roc_auc(ev)
    assert ev.info["pairs_positive"] == 0 and ev.info["pairs"] == 5000


def test_every_builtin_metric_is_registered_and_unknown_names_get_a_suggestion():
    assert set(RETRIEVAL + VERIFICATION) <= set(mltk.registry.list_metrics())
    x, labels = clustered(n=100)
    with pytest.raises(UsageError, match=r"unknown metric 'recal_at_k'; did you mean 'recall_at_k'"):
        evaluate_embeddings(x, labels, metrics=["recal_at_k"])
    with pytest.raises(metrics.NotApplicable, match="need embeddings and labels"):
        evaluate_embeddings(x, None, metrics=["recall_at_k"])


class _MedianRank:
    """A third-party metric that reuses the shared kNN pass."""

    calls = 0

    @mltk.hookimpl
    def register_metrics(self, register):
        def median_first_hit(ev):
            _MedianRank.calls += 1
            nb = ev.neighbours()
            first_hit = np.argmax(nb.match[nb.included], axis=1) + 1
            return {"median_first_hit": float(np.median(first_hit))}

        register("median_first_hit", median_first_hit)


def test_a_plugin_metric_is_computed_from_the_shared_pass():
    plugin = _MedianRank()
    pm.register(plugin, name="median_rank")
    try:
        x, labels = clustered(n=200)
        result = evaluate_embeddings(x, labels, metrics=["recall_at_k", "median_first_hit"])
        assert _MedianRank.calls == 1 and result.values["median_first_hit"] >= 1
        assert result.evaluation._neighbours is result.evaluation.neighbours()  # computed once, shared
    finally:
        pm.unregister(plugin)
    assert "median_first_hit" not in mltk.registry.list_metrics()


class _Declared:
    """Third-party metrics that say what they read, and one that says it wrongly."""

    @mltk.hookimpl
    def register_metrics(self, register):
        register("first_hit_share", lambda ev: {"first_hit_share": float(ev.neighbours().match[ev.neighbours().included, 0].mean())}, needs="neighbours")
        register("positive_share", lambda ev: {"positive_share": float(ev.pair_counts().positive.sum() / ev.total_pairs)}, needs="pairs")
        register("misdeclared", lambda ev: {}, needs="knn")


def test_a_plugin_metric_that_declares_what_it_needs_gets_only_that_pass(plugin, monkeypatch):
    from mltk.plugins import errors

    plugin(_Declared(), "declared")
    x, labels = clustered(n=300)
    passes = []
    block_pass = allpairs.block_pass
    monkeypatch.setattr(allpairs, "block_pass", lambda ev, k, knn, hist: passes.append((knn, hist)) or block_pass(ev, k, knn, hist))
    result = evaluate_embeddings(x, labels, metrics=["first_hit_share"])
    assert passes == [(True, False)] and result.evaluation._counts is None and "pairs" not in result.values  # no pair histogram
    assert result.values["first_hit_share"] == evaluate_embeddings(x, labels, metrics=["precision_at_k"]).values["precision@1"]
    passes.clear()
    result = evaluate_embeddings(x, labels, metrics=["positive_share"])
    assert passes == [(False, True)] and result.evaluation._neighbours is None and result.values["pairs"] == 300 * 299 // 2
    passes.clear()
    evaluate_embeddings(x, labels, metrics=["first_hit_share", "roc_auc"])  # both kinds asked for: still one pass
    assert passes == [(True, True)]
    # a metric that declares something else is refused on its own, in one line that names it; the others stay
    assert errors["declared"] == "register_metrics: metric 'misdeclared' refused: needs='knn' is not 'neighbours' or 'pairs' (or nothing, for both)"
    assert {"first_hit_share", "positive_share"} <= set(mltk.registry.list_metrics()) and "misdeclared" not in mltk.registry.list_metrics()
    with pytest.raises(UsageError, match=r"^unknown metric 'misdeclared'.*plugins that failed: declared; see `mltk plugins`"):
        evaluate_embeddings(x, labels, metrics=["misdeclared"])


def test_a_plugin_metric_that_declares_nothing_gets_both_kinds_of_work(monkeypatch):
    """As before metrics declared what they read: the pass fills the kNN heaps and the pair histogram for it."""
    plugin = _MedianRank()
    pm.register(plugin, name="median_rank")
    try:
        passes = []
        block_pass = allpairs.block_pass
        monkeypatch.setattr(allpairs, "block_pass", lambda ev, k, knn, hist: passes.append((knn, hist)) or block_pass(ev, k, knn, hist))
        evaluate_embeddings(*clustered(n=200), metrics=["median_first_hit"])
        assert passes == [(True, True)] and mltk.registry.get("metrics", "median_first_hit").needs is None
    finally:
        pm.unregister(plugin)


def test_bad_input_is_a_usage_error():
    x, labels = clustered(n=50)
    with pytest.raises(UsageError, match="L2-normalised"):
        evaluate_embeddings(x * 2, labels)
    with pytest.raises(UsageError, match="k=64 is more than the 49 gallery items"):
        evaluate_embeddings(x, labels, ks=(1, 64), metrics=["recall_at_k"])
    with pytest.raises(UsageError, match="49 labels for 50 embeddings"):
        evaluate_embeddings(x, labels[:-1])


def test_a_small_set_gets_verification_without_retrieval_ks():
    x, _ = clustered(n=6)
    labels = np.array([0, 0, 1, 1, 2, 2])
    values = evaluate_embeddings(x, labels, metrics=["roc_auc"]).values  # ks (1, 2, 4, 8) do not matter here
    assert values["pairs"] == 15 and values["pairs_positive"] == 3
    with pytest.raises(UsageError, match="k=8 is more than the 5 gallery items"):
        evaluate_embeddings(x, labels, metrics=["roc_auc", "recall_at_k"])


# ---- all-pairs verification on concentrated scores: exact agreement with scikit-learn ----------------


def dyadic(x, step=2**-12):
    """``x`` scaled to norms just under 1, its entries rounded to multiples of ``step``: with step 2**-12 every
    product is a multiple of 2**-24 and every partial sum of a dot product is at most 1, so numpy, torch and
    scikit-learn see the same float32 scores, whatever order they add in."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * (1 - 5e-4)
    return (np.round(x / step) * step).astype(np.float32)


def near_one(n=300, dim=32, classes=6, shift=2e-4, noise=5e-4, seed=0):
    """A nearly collapsed embedding: one common vector plus a small class shift and noise; scores within 1e-5 of 0.999."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    common = np.eye(dim)[0]
    return dyadic(common + shift * rng.standard_normal((classes, dim))[labels] + noise * rng.standard_normal((n, dim))), labels


def near_zero(n=300, dim=24, classes=6, shift=2e-4, noise=5e-4, seed=0):
    """Nearly orthogonal items (each on an axis of its own, plus a small class shift and noise in shared columns):
    every score within 1e-5 of 0, where float32 tells apart far finer differences than near 1. Exact, as ``dyadic``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    u = shift * rng.standard_normal((classes, dim))[labels] + noise * rng.standard_normal((n, dim))
    x = np.zeros((n, n + dim), np.float32)
    x[np.arange(n), np.arange(n)] = 4094 / 4096
    x[:, n:] = np.round(u * 2**16) / 2**16
    return x, labels


def spread_out():
    x, labels = clustered(n=300, classes=12, spread=1.0)
    return dyadic(x), labels


CONCENTRATED = {
    "near one": near_one,
    "near zero": near_zero,
    "identical": lambda: (np.full((300, 4), 0.5, np.float32), np.random.default_rng(0).integers(0, 6, 300)),
    "normal": spread_out,
}


def contiguous_folds(pairs_per_row, row_of_pair, folds=10):
    """The fold of each pair when the rows are cut into ``folds`` contiguous ranges of about equal pairs (mltk's all-pairs folds)."""
    before = np.concatenate([[0], np.cumsum(pairs_per_row)])
    edges = np.searchsorted(before, before[-1] * np.arange(folds + 1) / folds)
    return np.searchsorted(edges[1:], row_of_pair, side="right")


def sklearn_cv_balanced_accuracy(scores, same, folds):
    """10-fold balanced accuracy from scikit-learn's ROC of the training folds: the threshold with the highest mean of
    TAR and TNR (the highest among equals), applied to the held-out fold; folds without pairs of both kinds left out."""
    accuracies = []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        if not all(part.any() for part in (same[train], ~same[train], same[test], ~same[test])):
            continue
        fpr, tpr, thresholds = roc_curve(same[train], scores[train], drop_intermediate=False)
        positives, negatives = same[train].sum(), (~same[train]).sum()
        right = np.round(tpr * positives) * negatives + np.round((1 - fpr) * negatives) * positives  # exact: ties stay ties
        best = thresholds[np.flatnonzero(right == right.max())[0]]
        accuracies.append(((scores[test][same[test]] >= best).mean() + (scores[test][~same[test]] < best).mean()) / 2)
    return np.mean(accuracies), np.std(accuracies)


@pytest.mark.parametrize("path", ["all pairs", "query/gallery", "pair list"])
@pytest.mark.parametrize("case", sorted(CONCENTRATED))
def test_verification_matches_sklearn_however_concentrated_the_scores(case, path):
    x, labels = CONCENTRATED[case]()
    n, fars = len(x), (0.1, 0.01, 0.001)
    if path == "query/gallery":
        query = np.flatnonzero(np.random.default_rng(1).random(n) < 0.3)
        gallery = np.setdiff1d(np.arange(n), query)
        first, second = np.repeat(query, len(gallery)), np.tile(gallery, len(query))
        folds = contiguous_folds(np.full(len(query), len(gallery)), np.repeat(np.arange(len(query)), len(gallery)))
        values = evaluate_embeddings(x, labels, query=query, gallery=gallery, metrics=VERIFICATION, fars=fars, block=64, min_false_accepts=0).values
    else:
        first, second = np.triu_indices(n, 1)
        folds = contiguous_folds(np.arange(n - 1, -1, -1), first)
        if path == "pair list":
            pairs = Pairs.from_indices(x, first, second, labels[first] == labels[second], folds)
            values = evaluate_embeddings(None, pairs=pairs, metrics=VERIFICATION, fars=fars, min_false_accepts=0).values
        else:
            values = evaluate_embeddings(x, labels, metrics=VERIFICATION, fars=fars, block=64, min_false_accepts=0).values
    scores, same = np.einsum("ij,ij->i", x[first], x[second]), labels[first] == labels[second]
    if case in ("near one", "near zero"):  # the defect's shape: almost every pair within 1e-5 of the others
        assert np.mean(np.abs(scores - np.median(scores)) < 5e-6) > 0.98 and 0.6 < roc_auc_score(same, scores) < 0.75
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    assert values["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-4)
    for far in fars:
        assert values[f"tar@far={far:g}"] == pytest.approx(tpr[fpr <= far].max(), abs=1e-4), far
    assert values["eer"] == pytest.approx(sklearn_eer(fpr, tpr), abs=1e-4)
    crossing = int(np.argmax(fpr + tpr >= 1))  # the first ROC point past the EER: accepting at mltk's threshold gives it
    at = values["eer_threshold"]
    assert ((scores[~same] >= at).mean(), (scores[same] >= at).mean()) == pytest.approx((fpr[crossing], tpr[crossing]), abs=1e-4)
    assert (values["balanced_accuracy"], values["balanced_accuracy_std"]) == pytest.approx(sklearn_cv_balanced_accuracy(scores, same, folds), abs=1e-4)


def test_the_block_pass_computes_only_what_the_metrics_ask_for(monkeypatch):
    x, labels = clustered(n=300)
    passes = []
    block_pass = allpairs.block_pass
    monkeypatch.setattr(allpairs, "block_pass", lambda ev, k, knn, hist: passes.append((knn, hist)) or block_pass(ev, k, knn, hist))
    result = evaluate_embeddings(x, labels, metrics=VERIFICATION)  # no kNN heaps
    assert passes == [(False, True)] and result.evaluation._neighbours is None
    passes.clear()
    result = evaluate_embeddings(x, labels, metrics=RETRIEVAL)  # no pair histogram
    assert passes == [(True, False)] and result.evaluation._counts is None and "pairs" not in result.values
    passes.clear()
    result = evaluate_embeddings(x, labels, metrics=VERIFICATION + RETRIEVAL)  # both: still one pass
    assert passes == [(True, True)] and result.values["recall@1"] > 0


def test_concentrated_scores_take_no_more_memory_than_spread_ones():
    import tracemalloc

    def peak(x, labels):
        tracemalloc.start()
        try:
            evaluate_embeddings(x, labels, metrics=VERIFICATION)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    evaluate_embeddings(*near_one(n=50), metrics=VERIFICATION)  # numba compiles its kernels outside the measurement
    spread = peak(*clustered(n=600, classes=60))
    assert peak(*near_one(n=600)) <= 1.05 * spread and peak(*near_zero(n=600)) <= 1.05 * spread  # the bins split are counted in a smaller histogram


def test_the_int32_pair_counts_are_emptied_before_they_could_overflow(monkeypatch):
    counts = allpairs._FoldCounts(folds=1, threads=2, bins=4, block=4096)
    counts.every[0, 2] = counts.every[1, 2] = 2**31 - 2**20  # two threads, each near the int32 limit
    counts.counted(2**31 - 2**20)
    assert counts.every.sum() == 0 and counts.pending[2] == 2 * (2**31 - 2**20)  # moved into int64, not wrapped
    counts.every[0, 1] = 5
    counts.same[1, 1] = 2
    counts.fold_done(0)
    assert counts.by_fold[0].tolist() == [[0, 3, 2 * (2**31 - 2**20), 0], [0, 2, 0, 0]]  # (negative, positive) per bin
    assert allpairs._int32_room(4096) == 2**31 - 1 - 4096**2 and allpairs._int32_room(40_000) == 0

    # a pass that empties its int32 counts after every block gives the same histogram as one that never needs to
    x, labels = clustered(n=500)
    expected = evaluate_embeddings(x, labels, metrics=VERIFICATION, block=64).values
    monkeypatch.setattr(allpairs, "_int32_room", lambda block: 1)
    assert evaluate_embeddings(x, labels, metrics=VERIFICATION, block=64).values == expected
