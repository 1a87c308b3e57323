"""A detector's ranking against known poison, exactly, without sorting the whole dataset.

sklearn's ``roc_curve``, ``roc_auc_score``, ``average_precision_score`` and
``precision_recall_curve`` each sort every score (and the PR curve keeps a point per distinct
score: 16M rows of CSV at 16M samples). Every figure of a ranking changes only where a
positive's score lies, so ``rank_counts`` sorts the P known positives' scores and counts the
negatives at and above each of their distinct values, one chunk of negatives at a time:
O(N log P) time and O(P + chunk) memory beside the scores. The curves are the ROC and PR
curves' corners (ties drawn as sklearn draws them: a diagonal), and the AUROC, average precision
and FPR at a TPR are sklearn's (tests/test_ranking.py checks them against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipscrub.detectors import suspicion

# negatives counted per call: a chunk's bins and ranks (2 x 8 B a score) stay small
CHUNK = 1 << 20


@dataclass(frozen=True)
class RankCounts:
    """Per distinct positive score v (L,), descending: how many positives and negatives score
    >= v (``pos_ge``, ``neg_ge``) and > v (``pos_gt``, ``neg_gt``); ``positives`` P and
    ``negatives`` N - P in all."""

    pos_ge: np.ndarray  # (L,) int64
    pos_gt: np.ndarray  # (L,) int64
    neg_ge: np.ndarray  # (L,) int64
    neg_gt: np.ndarray  # (L,) int64
    positives: int
    negatives: int


def rank_counts(*, scores: np.ndarray, y: np.ndarray, chunk: int = CHUNK) -> RankCounts:
    """``scores`` (N,) float64, higher = more suspicious (non-finite ones should be +inf, the
    most suspicious: they tie above every finite score); ``y`` (N,) bool, the known positives,
    at least one of each class."""
    pos = np.sort(scores[y])
    if len(pos) == 0 or len(pos) == len(scores):
        raise ValueError("a ranking needs at least one positive and one negative")
    levels = np.unique(pos)[::-1]  # (L,) descending
    asc = levels[::-1]
    p = len(pos)
    pos_ge = p - np.searchsorted(pos, levels, side="left")
    pos_gt = p - np.searchsorted(pos, levels, side="right")
    # a negative s is >= the first searchsorted(asc, s, "right") ascending levels, > the first "left" ones
    at_or_above = np.zeros(len(asc) + 1, dtype=np.int64)
    above = np.zeros(len(asc) + 1, dtype=np.int64)
    negatives = 0
    for start in range(0, len(scores), chunk):
        s = scores[start:start + chunk][~y[start:start + chunk]]
        negatives += len(s)
        at_or_above += np.bincount(np.searchsorted(asc, s, side="right"), minlength=len(asc) + 1)
        above += np.bincount(np.searchsorted(asc, s, side="left"), minlength=len(asc) + 1)
    # negatives >= asc[j]: those whose count of levels below-or-at them exceeds j
    neg_ge_asc = negatives - np.cumsum(at_or_above)[:-1]
    neg_gt_asc = negatives - np.cumsum(above)[:-1]
    return RankCounts(pos_ge=pos_ge, pos_gt=pos_gt, neg_ge=neg_ge_asc[::-1].copy(), neg_gt=neg_gt_asc[::-1].copy(),
                      positives=p, negatives=negatives)


def rank_detector(*, values: np.ndarray, y: np.ndarray, detector: str) -> RankCounts:
    """``rank_counts`` of a detector's scores (N,) in its own units (low is suspicious for
    ``clip``): oriented so that higher is more suspicious, non-finite scores ranked above every
    finite one (the threshold stage flags them), so they count against the detector."""
    return rank_counts(scores=ranked_suspicion(values, detector), y=y)


def ranked_suspicion(values: np.ndarray, detector: str) -> np.ndarray:
    """A detector's scores (N,) oriented so that higher is more suspicious, non-finite ones +inf
    (above every finite one): how evaluate, the report and threshold's ranks order samples. May be
    ``values`` itself (finite, high = suspicious): not to be written to."""
    s = suspicion(values, detector)
    finite = np.isfinite(s)
    return s if finite.all() else np.where(finite, s, np.inf)


def _corners(c: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """The (fp, tp) counts where the ROC staircase turns, from (0, 0) to (negatives, positives):
    per level, the point just above it (> v) and at it (>= v)."""
    fp = np.concatenate([[0], np.column_stack([c.neg_gt, c.neg_ge]).ravel(), [c.negatives]])
    tp = np.concatenate([[0], np.column_stack([c.pos_gt, c.pos_ge]).ravel(), [c.positives]])
    keep = np.concatenate([[True], (np.diff(fp) != 0) | (np.diff(tp) != 0)])
    return fp[keep], tp[keep]


def roc_points(c: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve's corners, from (0, 0) to (1, 1): the curve sklearn's
    ``roc_curve`` draws (the points it drops lie on these segments)."""
    fp, tp = _corners(c)
    return fp / c.negatives, tp / c.positives


def auroc(c: RankCounts) -> float:
    """The area under ``roc_points``: P(a positive outranks a negative), ties counting half."""
    fpr, tpr = roc_points(c)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(c: RankCounts) -> float:
    """sklearn's average precision: the sum over the positive levels of the recall gained there
    times the precision at that cut (all samples scoring >= v)."""
    recall = c.pos_ge / c.positives
    precision = c.pos_ge / (c.pos_ge + c.neg_ge)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def fpr_at_tpr(c: RankCounts, target: float) -> float:
    """The FPR of the first cut, from the top, whose TPR reaches ``target`` (as the first point of
    sklearn's ROC curve at or past it)."""
    if target <= 0:
        return 0.0
    i = int(np.searchsorted(c.pos_ge / c.positives, target, side="left"))
    return float(c.neg_ge[min(i, len(c.neg_ge) - 1)] / c.negatives)


def pr_points(c: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of the PR curve's corners, recall descending to the point (0, 1) as
    sklearn's ``precision_recall_curve(drop_intermediate=True)`` writes them: at each cut where
    the recall changes and just before it. A cut that keeps nothing (no sample above the top
    positive) is not a point."""
    fp, tp = _corners(c)
    kept = (fp + tp) > 0
    fp, tp = fp[kept], tp[kept]
    return np.concatenate([(tp / c.positives)[::-1], [0.0]]), np.concatenate([(tp / (tp + fp))[::-1], [1.0]])


def score_histogram(values: np.ndarray, *, bins: int, y: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(edges (bins + 1,), counts (bins,), the known poison's counts (bins,) or None without
    ``y``) of a detector's finite scores (N,): counted a block at a time by np.histogram, with no
    copy of a column that is all finite and none per class (the clean are the rest)."""
    finite = np.isfinite(values)
    every = values if finite.all() else values[finite]
    edges = np.histogram_bin_edges(every, bins=bins)
    counts = np.histogram(every, bins=edges)[0]
    return edges, counts, None if y is None else np.histogram(values[finite & y], bins=edges)[0]
