"""Where a detector's scores are cut: the threshold rules (``threshold.method``), shared by the
threshold stage, which applies the rule, and by evaluate and the report, which apply each rule
to each detector for comparison; and the reasons a sample leaves the cleaned dataset.
The threshold stage's documentation says what each rule does and why."""

from __future__ import annotations

import numpy as np

from clipscrub.detectors import LOW_IS_SUSPICIOUS, robust_scales, suspicion
from clipscrub.params import ThresholdSettings

# the reason filter gives a sample removed by a person's review list (filter.remove_ids) only
REVIEW_REASON = "review"


def direction(detector: str) -> str:
    """Which side of the cut a detector's flagged samples lie on: ``below`` (score <= cut) or ``above``."""
    return "below" if detector in LOW_IS_SUSPICIOUS else "above"


def flag_outliers(*, values: np.ndarray, ids: np.ndarray | None, detector: str, settings: ThresholdSettings
                  ) -> tuple[np.ndarray, float]:
    """Boolean (N,) mask of finite scores past the cut, and the cut in the detector's own units
    (flagged: score >= cut, or score <= cut where low is suspicious; NaN without finite scores).
    ``ids`` (N,): what breaks top_fraction's ties (the other rules do not read them: None will do).
    Memory: a copy of the scores at most (no sort of all of them), so web-scale columns fit."""
    s = suspicion(values, detector)
    finite = np.isfinite(s)
    every = bool(finite.all())
    fin = s if every else s[finite]
    if not len(fin):
        return np.zeros(len(s), dtype=bool), float("nan")
    if settings.method == "top_fraction":
        if ids is None:
            raise ValueError("top_fraction breaks ties by id: pass the ids")
        top = top_rows(s, finite=finite, ids=ids, n=max(1, int(round(settings.fraction * len(s)))))
        mask = np.zeros(len(s), dtype=bool)
        mask[top] = True
        cut = float(s[top[-1]])
    else:
        if settings.method == "tail":
            cut = tail_cut(fin, fdr=settings.tail_fdr)
        elif settings.method == "score":
            cut = float(suspicion(np.array([settings.score]), detector)[0])
        else:
            med = np.median(fin)
            mad = 1.4826 * np.median(np.abs(fin - med))
            # no spread: only values strictly above the common value are outliers, so the cut is
            # the next float above it (the written cut then flags the same samples as a score rule)
            cut = float(med + settings.auto_z * mad) if mad > 0 else float(np.nextafter(med, np.inf))
        mask = s >= cut
        if not every:
            mask &= finite  # +inf is past any cut, but not an outlier: it is non-finite
    # back from "higher = more suspicious" to the detector's own units (negation is exact)
    return mask, float(suspicion(np.array([cut]), detector)[0])


def top_rows(s: np.ndarray, *, finite: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """The rows of the ``n`` most suspicious finite scores of ``s`` (N,) (higher = more
    suspicious), most suspicious first, ties by id: what a sort of every finite score by (score
    descending, id) gives first, from the rows at or above the n-th largest score alone."""
    rows = np.flatnonzero(finite) if not finite.all() else None
    fin = s if rows is None else s[rows]
    if n < len(fin):
        kth = np.partition(fin, len(fin) - n)[len(fin) - n]  # the n-th largest
        rows = np.flatnonzero((s >= kth) & finite)  # n of them, and those tied with the n-th
    elif rows is None:
        rows = np.arange(len(s))
    return rows[np.lexsort((ids[rows], -s[rows]))][:n]


def tail_cut(values: np.ndarray, *, fdr: float) -> float:
    """The lowest cut on finite oriented scores (N,) (higher = more suspicious) above which at most
    ``fdr`` of the samples are what the bulk's own upper tail accounts for.

    The bulk is modelled as a normal with the scores' median and the scale of their upper half
    (1.4826 x the median deviation above the median: robust to the flagged tail itself); at each
    candidate cut t, the bulk accounts for N x P(Z >= z(t)) samples above it (Benjamini-Hochberg
    with an empirical null, as in Efron's local false discovery rate). The flagged count thus
    follows how many samples stand out: none on clean data, all of a large poisoned group. With
    no such cut, the cut lies above the largest score (nothing flagged). Only the values that can
    pass (z >= the normal's upper ``fdr`` quantile) are sorted: O(N) but for the tail.
    """
    from scipy.stats import norm

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    med, _, scale = robust_scales(values)  # the upper half's scale, as robust_z takes it
    # a cut passes only where N x P(Z >= z) <= fdr x (its rank <= N), i.e. z >= isf(fdr): only the
    # values past that (less a margin for isf's rounding; z is monotone in the value, so they are
    # the top ones and keep their ranks) are sorted, not all N
    z_floor = norm.isf(fdr) - 1e-6 if fdr < 1 else -np.inf
    past = np.empty(n, dtype=bool)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # a scale near 0 makes z infinite: past any cut, as it should; a block at a time, not
        # two N-long temporaries
        for a in range(0, n, 1 << 20):
            past[a:a + (1 << 20)] = (values[a:a + (1 << 20)] - med) / scale >= z_floor
        v = np.sort(values[past])[::-1]
        expected = n * norm.sf((v - med) / scale)
    ok = np.flatnonzero(expected <= fdr * np.arange(1, len(v) + 1))
    return float(v[ok.max()]) if ok.size else float(np.nextafter(values.max(), np.inf))
