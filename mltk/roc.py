"""Pair counts → ROC curve, ROC-AUC, TAR@FAR, EER and cross-validated accuracy.

The counts are ``Binned``: positive and negative pairs per score bin and fold, bins in descending
order of score. They come from an explicit list of scores (``count_scores``, one bin per distinct
score) or from mltk.allpairs' histogram of all pairs; the rates read off them are exact at every
bin edge. ``mltk.thresholds`` reads its operating points off the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mltk.errors import UsageError

RULE_OF_30 = 30  # false accepts behind a FAR before it counts as measured (Doddington): TAR@FAR, and thresholds' ``reliable``


class NotApplicable(UsageError):
    """A metric that cannot be computed from what was given (no labels, a single class, ...)."""


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


def count_scores(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> Binned:
    """Exact counts of a list of pair scores: one bin per distinct score."""
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
