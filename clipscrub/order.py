"""Exact order statistics of a column held in pieces: each chunk's finite values sorted
(a run), never the column whole.

The score stage fuses reference sets with robust z-scores, whose medians and side MADs are
order statistics of the whole dataset; at web scale the column does not fit one process, and an
approximate quantile would move the cut. ``SortedRuns.kth`` finds the k-th smallest value by
bisection on the floats' order-preserving 64-bit keys, counting each run's values at or below a
candidate with one binary search: 64 rounds of one ``searchsorted`` per run, the runs memory-
mapped. The results are the very floats ``np.median`` gives on the whole column (same elements,
same arithmetic), so a run split into any pieces scores the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def float_key(x: float) -> int:
    """An integer that orders as the float does (-inf lowest, +inf highest; -0.0 just below 0.0)."""
    bits = int(np.float64(x).view(np.uint64))
    return (~bits) & ((1 << 64) - 1) if bits >> 63 else bits | (1 << 63)


def key_float(key: int) -> float:
    """The inverse of ``float_key``."""
    bits = key & ~(1 << 63) if key >> 63 else (~key) & ((1 << 64) - 1)
    return float(np.uint64(bits).view(np.float64))


class SortedRuns:
    """A column's finite values as ascending runs (M values in all). ``runs``: arrays, or
    .npy files memory-mapped."""

    def __init__(self, runs: Sequence[np.ndarray | str | Path]):
        self.runs = [np.load(r, mmap_mode="r") if isinstance(r, (str, Path)) else np.asarray(r) for r in runs]
        self.runs = [r for r in self.runs if len(r)]
        self.size = sum(len(r) for r in self.runs)

    def count_le(self, x: float) -> int:
        return sum(int(np.searchsorted(r, x, side="right")) for r in self.runs)

    def count_lt(self, x: float) -> int:
        return sum(int(np.searchsorted(r, x, side="left")) for r in self.runs)

    def kth(self, k: int) -> float:
        """The k-th smallest value (0-based), 0 <= k < M."""
        if not 0 <= k < self.size:
            raise IndexError(f"rank {k} of {self.size} values")
        lo = min(float_key(r[0]) for r in self.runs)
        hi = max(float_key(r[-1]) for r in self.runs)
        while lo < hi:  # the smallest key whose float has more than k values at or below it
            mid = (lo + hi) // 2
            if self.count_le(key_float(mid)) > k:
                hi = mid
            else:
                lo = mid + 1
        x = key_float(lo)
        # the element itself (-0.0 and 0.0 compare equal: keep the one the column holds)
        for r in self.runs:
            i = int(np.searchsorted(r, x, side="left"))
            if i < len(r) and r[i] == x:
                return float(r[i])
        raise AssertionError("bisection ended between values")  # pragma: no cover

    def median(self) -> float:
        """``np.median`` of the M values (the mean of the two middle ones when M is even)."""
        m = self.size
        if m % 2:
            return self.kth(m // 2)
        return float(np.mean([self.kth(m // 2 - 1), self.kth(m // 2)]))

    def _side_scale(self, med: float, *, upper: bool) -> float:
        """``clipscrub.detectors``' side scale of the values >= med (upper) or <= med: 1.4826 x
        the median of their distances to med; their mean (exactly rounded, whatever the runs),
        then 1, when that is 0."""
        if upper:
            first = self.count_lt(med)
            count = self.size - first
            dev = lambda j: self.kth(first + j) - med  # noqa: E731  (ascending in j)
        else:
            count = self.count_le(med)
            dev = lambda j: med - self.kth(count - 1 - j)  # noqa: E731
        if count == 0:
            return 1.0
        mid = dev(count // 2) if count % 2 else float(np.mean([dev(count // 2 - 1), dev(count // 2)]))
        scale = 1.4826 * mid
        if scale > 0:
            return scale
        parts = (r[np.searchsorted(r, med, side="left"):] - med if upper else med - r[:np.searchsorted(r, med, side="right")]
                 for r in self.runs)
        return math.fsum(v for p in parts for v in p.tolist()) / count or 1.0

    def robust_scales(self) -> tuple[float, float, float]:
        """(median, lower scale, upper scale), as ``clipscrub.detectors.robust_scales``; M >= 1."""
        med = self.median()
        return med, self._side_scale(med, upper=False), self._side_scale(med, upper=True)


def sorted_finite(values: np.ndarray) -> np.ndarray:
    """The finite values of (n,) as a run: ascending float64."""
    v = np.asarray(values, dtype=np.float64)
    return np.sort(v[np.isfinite(v)])
