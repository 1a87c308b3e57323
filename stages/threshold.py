"""Stage 6, threshold: flag samples from one detector's scores.

Rules (``threshold.method``):
- ``tail`` (the default): as many samples as stand out of the bulk. The bulk's scores are taken
  as a normal (median, upper-half robust scale), and the cut is the lowest at which at most
  ``tail_fdr`` of the flagged samples are what that bulk's own upper tail accounts for
  (``clipscrub.flagging.tail_cut``). It removes few samples from clean data and follows the poison's size: 0.1% or
  3% alike, where a fixed share removes too few of one or too many of the other;
- ``top_fraction``: the ``fraction`` most suspicious samples (1% in the paper),
  ties at the cut broken by id;
- ``score``: a fixed cut in the detector's own units (score >= cut; for ``clip``, whose low
  values are suspicious, cosine <= cut);
- ``auto``: a robust z-score rule: flag samples whose oriented score lies more than ``auto_z``
  robust standard deviations (1.4826 x median absolute deviation) above the median. 3.5 is
  Iglewicz and Hoaglin's usual cut; it adapts the removed count to how many outliers there are.
A sample whose score is not finite is always flagged, with its own reason, never dropped.

Every rule's cut is written in the detector's own units with its ``direction`` (``above``:
score >= cut flagged, ``below``: score <= cut), so ``method: score`` with that cut flags the
same samples (for ``top_fraction``, up to ties at the cut). A rule that flags no finite sample
says so: a ``warning`` in the summary, and the same line logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl

from clipscrub.errors import DataError
from clipscrub.flagging import direction, flag_outliers
from clipscrub.ranking import ranked_suspicion
from clipscrub.io import (ROW_GROUP_ROWS, ascending, atomic_dir, blocks, read_column, require_file, write_blocks, write_json,
                          write_lineage)
from clipscrub.params import BaseSettings, ThresholdSettings

log = logging.getLogger("clipscrub.threshold")


def _flags_nothing(*, values: np.ndarray, column: str, cut: float, detector: str) -> str:
    """The warning for a rule that flags no finite sample, with where the data lie."""
    def num(x: float) -> str:  # short, unless that would round onto a neighbouring value
        return f"{x:.6g}" if float(f"{x:.6g}") == x else repr(float(x))

    finite = values[np.isfinite(values)]
    op = "<=" if direction(detector) == "below" else ">="
    return (f"the rule flags 0 of {len(values)} samples: no {column} {op} {num(cut)} "
            f"(the finite scores range from {num(finite.min())} to {num(finite.max())})")


def rank_samples(*, values: np.ndarray, ids: np.ndarray, detector: str, block: int = ROW_GROUP_ROWS
                 ) -> Iterator[np.ndarray]:
    """Each sample's rank, 1 the most suspicious, by the detector's oriented ``values`` (N,)
    (non-finite first), ties by id: (b - a,) int64 per block [a, b) of ``block`` rows, in order.

    Where the ids ascend (as score writes them), a row's rank is the count of keys strictly more
    suspicious (a search in one sorted copy of the keys) plus its earlier rows of an equal key
    (a counter per group of ties): a copy of the column, no N-long index or rank array. Other
    ids take a lexsort."""
    n = len(values)
    key = -ranked_suspicion(values, detector)  # ascending = most suspicious first
    if not ascending(ids):
        rank = np.empty(n, dtype=np.int64)
        rank[np.lexsort((ids, key))] = np.arange(1, n + 1)
        del key
        yield from (rank[a:b] for a, b in blocks(n, block))
        return
    key.sort()
    same = key[1:] == key[:-1]
    tie_starts = np.flatnonzero(same & ~np.r_[False, same[:-1]])  # where a run of equal keys begins
    del same
    seen = np.zeros(len(tie_starts), dtype=np.int64)  # rows of each run met so far
    for a, b in blocks(n, block):
        k = -ranked_suspicion(values[a:b], detector)
        # searched in order: sorted needles walk the sorted keys, where scattered ones miss the cache
        by_key = np.argsort(k, kind="stable")
        rank = np.empty(len(k), dtype=np.int64)
        rank[by_key] = np.searchsorted(key, k[by_key], side="left") + 1
        if len(tie_starts):
            g = np.minimum(np.searchsorted(tie_starts, rank - 1), len(tie_starts) - 1)
            tied = np.flatnonzero(tie_starts[g] == rank - 1)
            if len(tied):
                run = g[tied]
                order = np.argsort(run, kind="stable")
                first = np.r_[True, run[order][1:] != run[order][:-1]]
                place = np.arange(len(run)) - np.maximum.accumulate(np.where(first, np.arange(len(run)), 0))
                earlier = np.empty(len(run), dtype=np.int64)
                earlier[order] = place  # the row's place among its run's rows in this block
                rank[tied] += seen[run] + earlier
                runs, counts = np.unique(run, return_counts=True)
                seen[runs] += counts
        yield rank


def _flag_rows(ids: np.ndarray, values: np.ndarray, rank: np.ndarray, is_outlier: np.ndarray,
               is_non_finite: np.ndarray, *, column: str, method: str) -> pl.DataFrame:
    """A block of flags.parquet's rows."""
    return pl.DataFrame({"id": ids, column: values, "rank": rank, "is_outlier": is_outlier,
                         "is_non_finite": is_non_finite, "is_flagged": is_outlier | is_non_finite}).with_columns(
        # an expression, not a list of Python strings
        pl.when(pl.col("is_non_finite")).then(pl.lit(f"non_finite_{column}"))
        .when(pl.col("is_outlier")).then(pl.lit(f"{column}_{method}"))
        .otherwise(pl.lit(None, dtype=pl.String)).alias("reason"))


def threshold_scores(
    *, scores_dir: str | Path, out_dir: str | Path, settings: ThresholdSettings, base: BaseSettings
) -> dict[str, Any]:
    """Write ``<out>/flags.parquet`` (id, score, rank, is_outlier, is_non_finite, is_flagged, reason)."""
    scores_dir = Path(scores_dir)
    path = require_file(scores_dir / "scores.parquet", param="--scores", what="scores")
    column = f"{settings.detector}_score"
    if column not in pl.read_parquet_schema(path):
        raise DataError(
            f"the scores have no {column!r} column: add {settings.detector!r} to score.detectors",
            param="threshold.detector",
        )
    # the one column the rule reads, and the ids: each once in memory
    values = read_column(path, column).astype(np.float64, copy=False)
    ids = read_column(path, "id")
    is_outlier, cut = flag_outliers(values=values, ids=ids, detector=settings.detector, settings=settings)
    is_non_finite = ~np.isfinite(values)
    n = len(values)
    flagged = int((is_outlier | is_non_finite).sum())
    summary = {
        "samples": n,
        "detector": settings.detector,
        "method": settings.method,
        "cut": cut if np.isfinite(cut) else None,
        "direction": direction(settings.detector),
        "flagged": flagged,
        "non_finite": int(is_non_finite.sum()),
    }
    if np.isfinite(cut) and not is_outlier.any():
        summary["warning"] = _flags_nothing(values=values, column=column, cut=cut, detector=settings.detector)
    elif flagged > n / 2:
        # no rule's cut is meant to take the bulk: a score rule's cut on the wrong side, a fraction
        # too large, or a set too small to have a bulk
        summary["warning"] = (f"the rule flags {flagged} of {n} samples, more than half: it is "
                              f"not cutting off a tail (check threshold.method and its cut)")
    if "warning" in summary:
        log.warning("threshold: %s", summary["warning"])
    with atomic_dir(out_dir) as tmp:
        ranks = rank_samples(values=values, ids=ids, detector=settings.detector)
        write_blocks((_flag_rows(ids[a:b], values[a:b], next(ranks), is_outlier[a:b], is_non_finite[a:b],
                                 column=column, method=settings.method) for a, b in blocks(n, ROW_GROUP_ROWS)),
                     tmp / "flags.parquet")
        write_json(tmp / "threshold.json", summary)
        write_lineage(
            tmp,
            module=__name__,
            stage="threshold",
            params={"base": base.model_dump(mode="json"), "threshold": settings.model_dump(mode="json")},
            inputs={"scores": scores_dir},
            upstream=[scores_dir],
            summary=summary,
        )
    return summary
