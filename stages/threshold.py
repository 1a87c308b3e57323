"""Stage 6, threshold: flag samples from one detector's scores.

Rules (``threshold.method``):
- ``top_fraction``: the ``fraction`` most suspicious samples (default 1%, as in the paper),
  ties at the cut broken by id;
- ``score``: a fixed cut in the detector's own units (score >= cut; for ``clip``, whose low
  values are suspicious, cosine <= cut);
- ``auto``: a robust z-score rule: flag samples whose oriented score lies more than ``auto_z``
  robust standard deviations (1.4826 x median absolute deviation) above the median. 3.5 is
  Iglewicz and Hoaglin's usual cut; it adapts the removed count to how many outliers there are.
A sample whose score is not finite is always flagged, with its own reason, never dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clipscrub.detectors import suspicion
from clipscrub.errors import DataError
from clipscrub.io import atomic_dir, require_file, write_json, write_lineage
from clipscrub.params import BaseSettings, ThresholdSettings


def flag_outliers(*, values: np.ndarray, ids: np.ndarray, detector: str, settings: ThresholdSettings) -> tuple[np.ndarray, float]:
    """Boolean (N,) mask of finite scores past the cut, and the cut in oriented units."""
    s = suspicion(values, detector)
    finite = np.isfinite(s)
    mask = np.zeros(len(s), dtype=bool)
    if not finite.any():
        return mask, float("nan")
    if settings.method == "top_fraction":
        n_flag = max(1, int(round(settings.fraction * len(s))))
        fin_idx = np.flatnonzero(finite)
        # most suspicious first; ties broken by id so the cut is deterministic
        order = fin_idx[np.lexsort((ids[fin_idx], -s[fin_idx]))][:n_flag]
        mask[order] = True
        return mask, float(s[order[-1]])
    if settings.method == "score":
        cut = float(suspicion(np.array([settings.score]), detector)[0])
    else:
        med = np.median(s[finite])
        mad = 1.4826 * np.median(np.abs(s[finite] - med))
        cut = float(med + settings.auto_z * mad) if mad > 0 else float(med)
        if mad == 0:  # no spread: only values strictly above the common value are outliers
            mask[finite] = s[finite] > cut
            return mask, cut
    mask[finite] = s[finite] >= cut
    return mask, cut


def threshold_scores(
    *, scores_dir: str | Path, out_dir: str | Path, settings: ThresholdSettings, base: BaseSettings
) -> dict[str, Any]:
    """Write ``<out>/flags.parquet`` (id, score, rank, is_outlier, is_non_finite, is_flagged, reason)."""
    scores_dir = Path(scores_dir)
    scores = pl.read_parquet(require_file(scores_dir / "scores.parquet", param="--scores", what="scores"))
    column = f"{settings.detector}_score"
    if column not in scores.columns:
        raise DataError(
            f"the scores have no {column!r} column: add {settings.detector!r} to score.detectors",
            param="threshold.detector",
        )
    values = scores[column].to_numpy().astype(np.float64)
    ids = scores["id"].to_numpy()
    is_outlier, cut = flag_outliers(values=values, ids=ids, detector=settings.detector, settings=settings)
    is_non_finite = ~np.isfinite(values)
    s = suspicion(values, settings.detector)
    rank = np.empty(len(s), dtype=np.int64)
    rank[np.lexsort((ids, -np.where(np.isfinite(s), s, np.inf)))] = np.arange(1, len(s) + 1)
    reason = np.where(
        is_non_finite, f"non_finite_{column}", np.where(is_outlier, f"{column}_{settings.method}", None)
    )
    flags = pl.DataFrame(
        {
            "id": ids,
            column: values,
            "rank": rank,
            "is_outlier": is_outlier,
            "is_non_finite": is_non_finite,
            "is_flagged": is_outlier | is_non_finite,
            "reason": pl.Series(reason.tolist(), dtype=pl.String),
        }
    )
    summary = {
        "samples": flags.height,
        "detector": settings.detector,
        "method": settings.method,
        "cut": cut if np.isfinite(cut) else None,
        "flagged": int(flags["is_flagged"].sum()),
        "non_finite": int(is_non_finite.sum()),
    }
    with atomic_dir(out_dir) as tmp:
        flags.write_parquet(tmp / "flags.parquet", statistics=False)
        write_json(tmp / "threshold.json", summary)
        write_lineage(
            tmp,
            stage="threshold",
            params={"base": base.model_dump(mode="json"), "threshold": settings.model_dump(mode="json")},
            inputs={"scores": scores_dir},
            upstream=[scores_dir],
            summary=summary,
        )
    return summary
