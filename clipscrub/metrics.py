"""The applied threshold's outcome as one flat metrics block (``data/metrics/applied.json``).

One function computes it, from flags (``is_flagged``: the samples filter removes; the threshold
stage's, or ``removed_as_flags`` of filter's own output, which review lists change) and the
ground truth where there is one; the evaluate stage writes it,
and the report, ``clipscrub diff``, ``clipscrub show`` and the Prefect flow's artifact show it.
Flat keys only, so ``dvc metrics show`` / ``dvc exp show`` list every key without ``--keep``:

- ``detector``, ``rule``: the detector thresholded and the rule (``top_fraction 0.01``,
  ``score >= 1.3`` (``<=`` for ``clip``), ``auto z 3.5``);
- ``samples`` (scored), ``removed`` (in total), ``removed_fraction``, ``removed_non_finite``;
- ``flagged`` (by the rule), ``kept_by_review`` (flagged, kept by ``filter.keep_ids``) and
  ``removed_by_review`` (not flagged, removed by ``filter.remove_ids``): removed = flagged -
  kept_by_review + removed_by_review, so the review is never credited to the detectors;
- ``poison_known``: whether every scored sample's ``is_poison`` is known (true or false);
- ``poison``, ``poison_removed``, ``poison_missed``, ``precision`` (poison_removed / removed),
  ``recall`` (poison_removed / poison): null without ground truth, and precision / recall also
  null where their denominator is 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl

from clipscrub.detectors import LOW_IS_SUSPICIOUS
from clipscrub.errors import DataError
from clipscrub.io import ascending, rows_of_ids
from clipscrub.params import ThresholdSettings

APPLIED_KEYS = (
    "detector", "rule", "samples", "flagged", "kept_by_review", "removed_by_review", "removed", "removed_fraction",
    "removed_non_finite", "poison_known", "poison", "poison_removed", "poison_missed", "precision", "recall",
)


def _num(x: float) -> str:
    short = f"{float(x):g}"
    return short if float(short) == float(x) else repr(float(x))


def rule_text(threshold: ThresholdSettings) -> str:
    """The threshold rule in a few words: ``tail fdr 0.2``, ``top_fraction 0.01``, ``score >= 1.3``,
    ``auto z 3.5``."""
    if threshold.method == "tail":
        return f"tail fdr {_num(threshold.tail_fdr)}"
    if threshold.method == "top_fraction":
        return f"top_fraction {_num(threshold.fraction)}"
    if threshold.method == "score":
        op = "<=" if threshold.detector in LOW_IS_SUSPICIOUS else ">="
        return f"score {op} {_num(threshold.score)}"
    return f"auto z {_num(threshold.auto_z)}"


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def applied_metrics(*, flags: pl.DataFrame, truth: pl.DataFrame | None, threshold: ThresholdSettings) -> dict[str, Any]:
    """The flat block for the flags actually applied.

    ``flags``: one row per scored sample with ``id`` and ``is_flagged`` (and ``is_non_finite``
    when known), as in ``flags.parquet``. ``truth``: ``id`` and ``is_poison`` (null = unknown),
    or None. The ground truth counts as known only if every scored sample has a non-null
    ``is_poison``; otherwise the poison keys are null and only the counts are given.
    """
    ids = flags["id"].to_numpy()
    if _repeats(ids):
        raise DataError("the flags hold duplicate ids: rerun threshold", param="--flags")
    flagged = flags["is_flagged"].fill_null(False)
    samples, removed = flags.height, int(flagged.sum())
    non_finite = int((flags["is_non_finite"].fill_null(False) & flagged).sum()) if "is_non_finite" in flags.columns else 0
    block: dict[str, Any] = {
        "detector": threshold.detector,
        "rule": rule_text(threshold),
        "samples": samples,
        # the flags as applied, with no review: applied_removal sets the review's share
        "flagged": removed,
        "kept_by_review": 0,
        "removed_by_review": 0,
        "removed": removed,
        "removed_fraction": _ratio(removed, samples) if samples else 0.0,
        "removed_non_finite": non_finite,
        "poison_known": False,
        "poison": None,
        "poison_removed": None,
        "poison_missed": None,
        "precision": None,
        "recall": None,
    }
    if truth is None or "is_poison" not in truth.columns:
        return block
    if truth.height == samples and np.array_equal(truth["id"].to_numpy(), ids):
        y = truth["is_poison"].cast(pl.Boolean)  # row for row the flags' samples (evaluate's and the report's)
    else:
        y = flags.select("id").join(truth.select("id", pl.col("is_poison").cast(pl.Boolean)).unique("id", keep="first"),
                                    on="id", how="left", maintain_order="left")["is_poison"]
    if samples == 0 or y.null_count() > 0:
        return block
    poison = int(y.sum())
    hit = int((flagged & y).sum())
    block.update(
        poison_known=True, poison=poison, poison_removed=hit, poison_missed=poison - hit,
        precision=_ratio(hit, removed), recall=_ratio(hit, poison),
    )
    return block


def _repeats(ids: np.ndarray) -> bool:
    """Whether an id occurs twice in (N,): with no copy where the ids ascend, as the stages write them."""
    if ascending(ids):
        return False
    ordered = np.sort(ids)
    return bool((ordered[1:] == ordered[:-1]).any())


def removed_as_flags(*, flags: pl.DataFrame, removed: Iterable[int], scored: pl.Series) -> pl.DataFrame:
    """``flags`` with ``is_flagged`` set to what filter removed (the ids of its ``removed.parquet``:
    the flags less the review's keep list, plus its remove list), for ``applied_metrics``;
    ``scored``: the ids the scores hold, which every removed id must be among."""
    removed = sorted(set(removed))
    # searched among the scored ids, not a Python set of N ints (about 100 bytes a sample) nor np.isin's sort
    if not (rows_of_ids(scored.to_numpy(), removed) >= 0).all():
        raise DataError("the cleaned version removed samples the scores do not hold: rerun filter", param="--clean")
    return flags.with_columns(is_flagged=pl.col("id").is_in(pl.Series(removed, dtype=flags.schema["id"]).implode()))


def read_applied(path: str | Path) -> dict[str, Any] | None:
    """The block written at ``path``, or None if there is none."""
    import json

    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def fmt_ratio(x: float | None) -> str:
    """A precision or recall to 3 places; ``n/a`` where it is undefined (None)."""
    return "n/a" if x is None else f"{x:.3f}"


def removal_words(counts: dict[str, Any]) -> str:
    """Who removed what, e.g. ``4 flagged by the detectors, 4 of them kept by review, 2 others
    removed by review`` or ``all flagged by the detectors``: the review's share said apart."""
    kept, added = counts.get("kept_by_review") or 0, counts.get("removed_by_review") or 0
    if not kept and not added:
        return "all flagged by the detectors"
    flagged = counts.get("flagged", counts.get("removed", 0) + kept - added)
    return (f"{flagged:,} flagged by the detectors, {kept:,} of them kept by review, "
            f"{added:,} {'others ' if flagged else ''}removed by review")


def applied_sentence(block: dict[str, Any]) -> str:
    """One line about the applied threshold, e.g. ``kdist, top_fraction 0.01: removed 60 of 6000
    (1.00%); all flagged by the detectors. 52 of the 60 removed are known poison (precision 0.867,
    recall 0.867; 8 known poison missed)``."""
    frac = block.get("removed_fraction") or 0.0
    head = f"{block['detector']}, {block['rule']}: removed {block['removed']} of {block['samples']} ({frac:.2%})"
    if block.get("removed_non_finite"):
        head += f", {block['removed_non_finite']} of them for a non-finite score"
    head += f"; {removal_words(block)}"
    if not block.get("poison_known"):
        return head + ". No ground truth: precision and recall unknown."
    return (f"{head}. {block['poison_removed']} of the {block['removed']} removed are known poison "
            f"(precision {fmt_ratio(block['precision'])}, recall {fmt_ratio(block['recall'])}; "
            f"{block['poison_missed']} known poison missed).")
