"""Stage 8, evaluate (when ground truth exists): detection quality of every detector.

Writes a DVC metrics JSON (per detector: AUROC, PR-AUC, FPR and detection error at the
``evaluate.tpr`` true-positive rate, precision and recall when the threshold rule is applied to
that detector) and DVC plot data: ``roc/<detector>.csv`` (fpr, tpr) and ``hist/<detector>.csv``
(score bin centre, clean and poisoned counts), ``pr/<detector>.csv`` (recall, precision). The
curves are their corners and the figures exact without sorting the dataset
(``clipscrub.ranking``: the known poison's scores are sorted, the rest counted against them), and
the scores are read a column at a time. Non-finite scores rank as the most suspicious (the
threshold stage flags them), so they count against a detector rather than vanish.
It also writes ``applied.json``: the threshold actually applied as one flat block,
``clipscrub.metrics.applied_metrics``, with or without ground truth: of the flags, or, given the
filter stage's output, of what filter removed after a person's review lists (then with
``flagged``, ``removed_by_review`` and ``kept_by_review``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clipscrub.errors import DataError
from clipscrub.io import (atomic_dir, atomic_file, read_column, read_frame, read_json, require_file, same_ids, scan_manifest,
                          write_json)
from clipscrub.metrics import applied_metrics, removed_as_flags
from clipscrub.params import DENSITY_RATIO_DETECTORS, BaseSettings, EvaluateSettings, ThresholdSettings
from clipscrub.ranking import (RankCounts, auroc, average_precision, fpr_at_tpr, pr_points, rank_detector, roc_points,
                               score_histogram)
from clipscrub.sources import scored_truth
from clipscrub.flagging import flag_outliers


def detection_metrics(*, y: np.ndarray, values: np.ndarray, detector: str, tpr_target: float, flagged: np.ndarray,
                      counts: RankCounts | None = None) -> dict[str, float]:
    """AUROC, PR-AUC (average precision), FPR / detection error at ``tpr_target``, precision /
    recall of ``flagged``; ``y``, ``values``, ``flagged`` (N,). ``counts``: the ranking's
    ``clipscrub.ranking.rank_counts``, where the caller has them."""
    counts = counts or rank_detector(values=values, y=y, detector=detector)
    fpr_at = fpr_at_tpr(counts, tpr_target)
    tp = int((flagged & y).sum())
    return {
        "auroc": round(auroc(counts), 6),
        "pr_auc": round(average_precision(counts), 6),
        "fpr_at_tpr": round(fpr_at, 6),
        "detection_error_at_tpr": round(0.5 * (1 - tpr_target) + 0.5 * fpr_at, 6),
        "precision_at_threshold": round(tp / flagged.sum(), 6) if flagged.any() else 0.0,
        "recall_at_threshold": round(tp / y.sum(), 6),
        "flagged": int(flagged.sum()),
    }


def applied_removal(*, flags: pl.DataFrame, clean_dir: Path, truth: pl.Series, scored: pl.Series,
                    threshold: ThresholdSettings) -> dict[str, Any]:
    """The applied block of what filter removed (``removed.parquet``): the flags less the review's
    keep list, plus its remove list: ``flagged`` is the detector's flags, and where filter applied
    review lists (its lineage's ``review``) ``removed_by_review`` counts the unflagged samples the
    remove list removed (reason ``review``) and ``kept_by_review`` the flagged samples the keep list
    kept (``overruled.parquet``)."""
    from clipscrub.flagging import REVIEW_REASON

    removed = pl.read_parquet(require_file(clean_dir / "removed.parquet", param="--clean", what="cleaned version"))
    lineage = read_json(require_file(clean_dir / "lineage.json", param="--clean", what="cleaned version"))
    actual = removed_as_flags(flags=flags, removed=removed["id"].to_list(), scored=scored)
    block = applied_metrics(flags=actual, truth=pl.DataFrame({"id": scored, "is_poison": truth}), threshold=threshold)
    block["flagged"] = int(flags["is_flagged"].sum())
    if "review" in lineage:
        overruled = pl.read_parquet(require_file(clean_dir / "overruled.parquet", param="--clean", what="cleaned version"))
        block |= {"removed_by_review": int((removed["reason"] == REVIEW_REASON).sum()),
                  "kept_by_review": overruled.height}
    return block


def evaluate_detectors(
    *,
    raw_dir: str | Path,
    scores_dir: str | Path,
    metrics_path: str | Path,
    plots_dir: str | Path,
    settings: EvaluateSettings,
    threshold: ThresholdSettings,
    base: BaseSettings,
    flags_dir: str | Path | None = None,
    applied_path: str | Path | None = None,
    clean_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compare every detector's scores with the manifest's ``is_poison`` ground truth.

    With ``flags_dir`` and ``applied_path``, also write the applied threshold's flat block
    (``clipscrub.metrics.applied_metrics``, against the same truth) and return it under
    ``applied``: of the flags, or with ``clean_dir`` (the filter stage's output) of what filter
    actually removed, the review lists applied (``applied_removal``)."""
    scan_manifest(raw_dir)  # checked readable and not empty
    scores_path = require_file(Path(scores_dir) / "scores.parquet", param="--scores", what="scores")
    # one column at a time: the ids, then each detector's scores as its figures need them
    ids = read_column(scores_path, "id")
    scored = pl.Series("id", ids)  # the same memory
    # a ground-truth table wins over the manifest's is_poison
    truth = scored_truth(raw_dir, ids=ids, truth=settings.truth)
    detectors = [c.removesuffix("_score") for c in pl.read_parquet_schema(scores_path) if c.endswith("_score")]
    has_truth = truth.null_count() == 0 and 0 < int(truth.sum()) < len(truth)
    metrics: dict[str, Any] = {"ground_truth": bool(has_truth), "samples": len(scored)}
    applied = None
    if flags_dir is not None and applied_path is not None:
        flags_path = require_file(Path(flags_dir) / "flags.parquet", param="--flags", what="flags")
        flags = read_frame(flags_path, [c for c in ("id", "is_flagged", "is_non_finite")
                                        if c in pl.read_parquet_schema(flags_path)])
        if not same_ids(flags["id"], scored):
            raise DataError("flags and scores disagree on the sample ids: rerun threshold", param="--flags")
        applied = applied_metrics(flags=flags, truth=pl.DataFrame({"id": scored, "is_poison": truth}),
                                  threshold=threshold) if clean_dir is None else \
            applied_removal(flags=flags, clean_dir=Path(clean_dir), truth=truth, scored=scored, threshold=threshold)
        del flags
    if threshold.method != "top_fraction":  # the only rule that reads ids (its ties): one N-long column less
        del ids, scored
        ids = None
    with atomic_dir(plots_dir) as tmp_plots:
        (tmp_plots / "roc").mkdir()
        (tmp_plots / "hist").mkdir()
        (tmp_plots / "pr").mkdir()
        if has_truth:
            y = truth.to_numpy().astype(bool)
            metrics["poisoned"] = int(y.sum())
            metrics["tpr_target"] = settings.tpr
            metrics["threshold"] = {"detector": threshold.detector, "method": threshold.method}
            per: dict[str, Any] = {}
            for d in detectors:
                values = read_column(scores_path, f"{d}_score").astype(np.float64, copy=False)
                rule = threshold.model_copy(update={"detector": d})
                flagged, _ = flag_outliers(values=values, ids=ids, detector=d, settings=rule)
                flagged |= ~np.isfinite(values)
                counts = rank_detector(values=values, y=y, detector=d)
                per[d] = detection_metrics(y=y, values=values, detector=d, tpr_target=settings.tpr, flagged=flagged,
                                           counts=counts)
                fpr, tpr = roc_points(counts)
                pl.DataFrame({"fpr": fpr, "tpr": tpr}).write_csv(tmp_plots / "roc" / f"{d}.csv", float_precision=6)
                recall, precision = pr_points(counts)
                pl.DataFrame({"recall": recall, "precision": precision}).write_csv(
                    tmp_plots / "pr" / f"{d}.csv", float_precision=6)
                edges, counts, poison_counts = score_histogram(values, bins=settings.hist_bins, y=y)
                clean_counts = counts - poison_counts
                pl.DataFrame(
                    {"score": (edges[:-1] + edges[1:]) / 2, "clean": clean_counts, "poisoned": poison_counts}
                ).write_csv(tmp_plots / "hist" / f"{d}.csv", float_precision=6)
                del values, flagged  # before the next detector's column is read
            metrics["detectors"] = per
            best = max((d for d in detectors if d in DENSITY_RATIO_DETECTORS), key=lambda d: per[d]["auroc"], default=None)
            if best:
                metrics["best_density_ratio"] = {"detector": best, "auroc": per[best]["auroc"]}
        with atomic_file(metrics_path) as tmp_metrics:
            write_json(tmp_metrics, metrics)
            if applied is not None:
                with atomic_file(applied_path) as tmp_applied:
                    write_json(tmp_applied, applied)
    return metrics if applied is None else {**metrics, "applied": applied}
